// The ceiling of EConv's lookups on this CPU, one thread (tools/bench/lookup_ceiling.py builds and
// runs it): how many table entries per second the lookups' inner loop (kernels/lookup_impl.cc,
// econv_lookup_channels: 8 output channels of 2 vectors with AVX-512, 4 with AVX2, 9 kernel offsets,
// each load at its own offset) adds from tables that stay in L1. Three placements of the table rows: aligned to the vector, one float past it (every
// vector load crosses a cache line with AVX-512), and a 3x3 kernel's columns (0, 1 or 2 floats past: a
// row read at stride 1 on the padded grid, what EConv's lookups read). Prints one JSON line.
//
// Compiled with the flags of an instruction set of kernels/build.py and -DONNXMERGE_VEC; vectors are
// GCC vector extensions loaded with memcpy, as in lookup_impl.cc.
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#ifndef ONNXMERGE_VEC
#define ONNXMERGE_VEC 8
#endif
constexpr int VEC = ONNXMERGE_VEC;
typedef float vec __attribute__((vector_size(VEC * sizeof(float))));
inline vec load(const float* p) {
  vec v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

constexpr int kChannels = VEC == 16 ? 8 : 4, kVecs = 2, kTaps = 9;
double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// table entries added per second by the lookups' inner loop; shift(rng) places each table row
template <typename Shift>
double lookup_rate(Shift shift) {
  constexpr int codes = 64, plane = 96;  // 64 codewords x 96 floats: 24 KiB, half a 48 KiB L1d
  alignas(64) static float table[codes * plane + 4 * VEC];  // rows start on cache lines (plane: 6 lines)
  for (int i = 0; i < codes * plane + 4 * VEC; ++i) table[i] = 1e-6f * static_cast<float>(i % 1000);
  std::mt19937 rng(0);
  constexpr int sets = 64;  // offsets of 64 (channel block, segment) pairs, cycled through
  std::vector<int32_t> off(sets * kChannels * kTaps);
  for (auto& o : off) o = static_cast<int32_t>(rng() % codes) * plane + shift(rng);
  const int64_t rounds = 2'000'000;
  vec acc[kChannels][kVecs] = {};
  const auto t0 = std::chrono::steady_clock::now();
  for (int64_t r = 0; r < rounds; ++r) {
    const int32_t* ov = off.data() + (r % sets) * kChannels * kTaps;
    for (int i = 0; i < kTaps; ++i)
      for (int ob = 0; ob < kChannels; ++ob) {
        const float* src = table + ov[ob * kTaps + i];
        for (int k = 0; k < kVecs; ++k) acc[ob][k] += load(src + k * VEC);
      }
  }
  const double s = seconds_since(t0);
  float sink = 0.0f;
  for (auto& a : acc)
    for (auto& v : a) sink += v[0];
  std::fprintf(stderr, "%g\n", sink);
  return static_cast<double>(rounds) * kTaps * kChannels * kVecs * VEC / s;
}

int main() {
  const double aligned = lookup_rate([](std::mt19937&) { return 0; });
  const double past_one = lookup_rate([](std::mt19937&) { return 1; });
  const double columns = lookup_rate([](std::mt19937& rng) { return static_cast<int>(rng() % 3); });
  std::printf("{\"vec\": %d, \"channels\": %d, \"lookup_aligned_per_s\": %.4g, \"lookup_past_one_per_s\": %.4g, "
              "\"lookup_3x3_columns_per_s\": %.4g}\n",
              VEC, kChannels, aligned, past_one, columns);
  return 0;
}
