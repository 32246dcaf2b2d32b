// Checking and repacking a layer's constant inputs once, the per-input-size plans of EConv, and the
// choice of instruction set; see lookup.h. Compiled once, for any CPU.
#include <unistd.h>
#if defined(__aarch64__) && defined(__linux__)
#include <asm/hwcap.h>
#include <sys/auxv.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <fstream>
#include <limits>
#include <string>
#include <type_traits>

#include "lookup.h"

namespace onnxmerge {

// The hot loops, one namespace per instruction set (lookup_impl.cc, compiled with its flags).
namespace isa_generic { extern const IsaKernels kernels; }
#if defined(__x86_64__)
namespace isa_avx2 { extern const IsaKernels kernels; }
namespace isa_avx512 { extern const IsaKernels kernels; }
#elif defined(__aarch64__)
namespace isa_neon { extern const IsaKernels kernels; }
#endif

namespace {

// A segment group's tables are sized to stay in a core's L2 cache: half of it (512 KiB on the 1 MiB
// L2 of Zen 4, where that was measured best), the other half for the input rows and outputs.
int64_t table_budget_bytes() { return onnxmerge::cache_sizes().l2 / 2; }

// "48K" / "2048K" / "1M" (sysfs cache size) -> bytes; 0 where it does not parse.
int64_t parse_size(const std::string& text) {
  char* end = nullptr;
  const long long n = std::strtoll(text.c_str(), &end, 10);
  if (end == text.c_str() || n <= 0) return 0;
  const char unit = *end;
  return unit == 'K' ? n << 10 : unit == 'M' ? n << 20 : unit == 'G' ? n << 30 : n;
}

std::string read_line(const std::string& path) {
  std::ifstream in(path);
  std::string line;
  std::getline(in, line);
  return line;
}

int64_t env_bytes(const char* name) {
  const char* v = std::getenv(name);
  return v ? parse_size(v) : 0;
}
void fail(const std::string& what) { throw std::invalid_argument(what); }

// ONNXMERGE_ECONV_ORDER forces the order of float tables' lookups (EConvPlan::channels): "channels"
// or "rows" ("" where it is not set), for tests and timings
std::string econv_order() {
  const char* v = std::getenv("ONNXMERGE_ECONV_ORDER");
  const std::string order = v ? v : "";
  if (!order.empty() && order != "channels" && order != "rows")
    fail("ONNXMERGE_ECONV_ORDER must be channels or rows, not '" + order + "'");
  return order;
}

int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

void check_codebook(int64_t Vc, int64_t C, int64_t r, int64_t V, int64_t d, const char* op) {
  const std::string name(op);
  if (Vc <= 0 || C <= 0 || r <= 0) fail(name + ": codebook must be [V', C, r] with positive sizes");
  if (C > 65536) fail(name + ": codebooks of more than 65536 codewords are not supported");
  if (V <= 0) fail(name + ": codes have no segments");
  if (V > Vc) fail(name + ": codes have " + std::to_string(V) + " segments but the codebook only " + std::to_string(Vc));
  if (d > V * r || d <= 0)
    fail(name + ": input depth " + std::to_string(d) + " does not fit " + std::to_string(V) + " segments of " +
         std::to_string(r));
}

template <typename Code>
void check_codes(const Code* codes, int64_t count, int64_t C, const char* op) {
  Code top = 0;
  for (int64_t k = 0; k < count; ++k) top = std::max(top, codes[k]);
  if (count > 0 && static_cast<int64_t>(top) >= C)
    fail(std::string(op) + ": code index " + std::to_string(top) + " out of range for a codebook of " +
         std::to_string(C) + " codewords");
}

// Integer tables (EConvLayer::seg_bound)

void check_table_bits(int64_t bits, const char* op) {
  if (bits != 32 && bits != 16 && bits != 8)
    fail(std::string(op) + ": table_bits must be 32, 16 or 8, not " + std::to_string(bits));
}

// [V]: max over segment v's codewords of sum_k |w_k| (k < the segment's depth of d channels)
std::vector<float> segment_bounds(const float* codebook, int64_t V, int64_t C, int64_t r, int64_t d) {
  std::vector<float> bound(static_cast<size_t>(V), 0.0f);
  for (int64_t v = 0; v < V; ++v) {
    const int64_t depth = std::clamp<int64_t>(d - v * r, 0, r);
    for (int64_t c = 0; c < C; ++c) {
      float norm = 0.0f;  // in order over k, as the numpy reference sums it
      for (int64_t k = 0; k < depth; ++k) norm += std::abs(codebook[(v * C + c) * r + k]);
      bound[v] = std::max(bound[v], norm);
    }
  }
  return bound;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// cache sizes

const CacheSizes& cache_sizes() {
  static const CacheSizes sizes = [] {
    CacheSizes c;
    // sysfs: cpu0's caches by level and type (a per-core L1 data and L2 on every x86 and ARM part we know)
    for (int i = 0; i < 8; ++i) {
      const std::string dir = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(i) + "/";
      const std::string level = read_line(dir + "level"), type = read_line(dir + "type");
      const int64_t bytes = parse_size(read_line(dir + "size"));
      if (level == "1" && type == "Data" && bytes) c.l1d = bytes;
      if (level == "2" && type != "Instruction" && bytes) c.l2 = bytes;
    }
    c.source = c.l1d && c.l2 ? "sysfs" : "";
#if defined(_SC_LEVEL1_DCACHE_SIZE) && defined(_SC_LEVEL2_CACHE_SIZE)
    if (!c.l1d) c.l1d = std::max<long>(0, sysconf(_SC_LEVEL1_DCACHE_SIZE));
    if (!c.l2) c.l2 = std::max<long>(0, sysconf(_SC_LEVEL2_CACHE_SIZE));
    if (c.source.empty() && c.l1d && c.l2) c.source = "sysconf";
#endif
    if (!c.l1d) c.l1d = 32 << 10;
    if (!c.l2) c.l2 = 1 << 20;
    if (c.source.empty()) c.source = "defaults";
    if (const int64_t l1 = env_bytes("ONNXMERGE_L1D_BYTES")) c.l1d = l1, c.source = "environment";
    if (const int64_t l2 = env_bytes("ONNXMERGE_L2_BYTES")) c.l2 = l2, c.source = "environment";
    c.l1d = std::max<int64_t>(c.l1d, 4 << 10);  // a block holds at least a few tables
    c.l2 = std::max<int64_t>(c.l2, 64 << 10);
    return c;
  }();
  return sizes;
}

// ---------------------------------------------------------------------------------------------
// instruction sets

std::vector<std::string> built_isas() {
#if defined(__x86_64__)
  return {"avx512", "avx2", "generic"};
#elif defined(__aarch64__)
  return {"neon", "generic"};
#else
  return {"generic"};
#endif
}

bool cpu_supports(const std::string& isa) {
  if (isa == "generic") return true;
#if defined(__x86_64__)
  __builtin_cpu_init();
  if (isa == "avx2") return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (isa == "avx512")
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq");
#elif defined(__aarch64__) && defined(__linux__)
  // Advanced SIMD is part of every ARMv8-A Linux system; the kernel still says so in its hardware caps
  if (isa == "neon") return (getauxval(AT_HWCAP) & HWCAP_ASIMD) != 0;
#elif defined(__aarch64__)
  if (isa == "neon") return true;
#endif
  return false;
}

const IsaKernels& choose_isa(const std::string& isa) {
  const auto kernels_of = [](const std::string& name) -> const IsaKernels& {
#if defined(__x86_64__)
    if (name == "avx512") return isa_avx512::kernels;
    if (name == "avx2") return isa_avx2::kernels;
#elif defined(__aarch64__)
    if (name == "neon") return isa_neon::kernels;
#endif
    (void)name;
    return isa_generic::kernels;
  };
  if (isa.empty()) {
    for (const auto& name : built_isas())
      if (cpu_supports(name)) return kernels_of(name);
  }
  const auto built = built_isas();
  if (std::find(built.begin(), built.end(), isa) == built.end()) {
    std::string known;
    for (const auto& name : built) known += (known.empty() ? "" : ", ") + name;
    fail("unknown instruction set '" + isa + "' (this build has: " + known + ")");
  }
  if (!cpu_supports(isa)) fail("this CPU does not support the instruction set '" + isa + "'");
  return kernels_of(isa);
}

// ---------------------------------------------------------------------------------------------
// EConv

template <typename Code>
void pack_econv(EConvLayer& layer, const EConvParams& s, int64_t Vc, const float* codebook, const Code* codes,
                const std::string& isa) {
  check_codebook(Vc, s.C, s.r, s.V, s.d, "EConv");
  if (s.p <= 0 || s.kh <= 0 || s.kw <= 0) fail("EConv: codes must be [V, p, kh, kw] with positive sizes");
  if (s.sh <= 0 || s.sw <= 0 || s.dh <= 0 || s.dw <= 0) fail("EConv: strides and dilations must be positive");
  if (s.pt < 0 || s.pl < 0 || s.pb < 0 || s.pr < 0) fail("EConv: pads must be non-negative");
  check_table_bits(s.table_bits, "EConv");
  const int64_t taps = s.kh * s.kw;
  check_codes(codes, s.V * s.p * taps, s.C, "EConv");
  layer.isa = &choose_isa(isa);
  layer.isa_forced = !isa.empty();
  layer.s = s;
  layer.codebook.assign(codebook, codebook + s.V * s.C * s.r);
  layer.seg_bound = segment_bounds(codebook, s.V, s.C, s.r, s.d);
  // [V][p][taps] -> [p][V][taps]: an output channel's codes of all segments are contiguous
  layer.codes.resize(static_cast<size_t>(s.p * s.V * taps));
  for (int64_t v = 0; v < s.V; ++v)
    for (int64_t o = 0; o < s.p; ++o)
      for (int64_t t = 0; t < taps; ++t) layer.codes[(o * s.V + v) * taps + t] = codes[(v * s.p + o) * taps + t];
  std::lock_guard<std::mutex> guard(layer.lock_);
  layer.plans_.clear();
}

// EConv's lookups, unless flat (EConvPlan::flat, which runs the widest vectors), add whole vectors of
// an output row: a row of Wo outputs takes ceil(Wo / vec) vectors, and the lanes past Wo are work
// thrown away (Wo = 8 on 16-float vectors: half). Of the instruction
// sets this CPU runs, the one whose vectors waste the fewest lanes of a row, the best-ranked (`best`,
// chosen first) among those that waste as few: the lookups are bound by the bytes they load, not by
// the vector width (measured on a Xeon with AVX-512: AVX2 as fast on rows of 16, faster on rows of
// 8, 18 and 24, kernels/standalone timings; tools/bench/kernel_grid.py has the layers).
namespace {
const IsaKernels& fullest_vectors(const IsaKernels& best, int64_t Wo) {
  const auto waste = [Wo](const IsaKernels& k) { return round_up(Wo, k.vec) - Wo; };
  const IsaKernels* chosen = &best;
  for (const auto& name : built_isas())
    if (cpu_supports(name) && waste(choose_isa(name)) < waste(*chosen)) chosen = &choose_isa(name);
  return *chosen;
}
}  // namespace

std::shared_ptr<const EConvPlan> EConvLayer::plan(int64_t H, int64_t W) const {
  std::lock_guard<std::mutex> guard(lock_);
  for (const auto& p : plans_)
    if (p->H == H && p->W == W) return p;
  if (H <= 0 || W <= 0) fail("EConv: input must be [N, d, H, W] with positive H, W");
  auto plan = std::make_shared<EConvPlan>();
  EConvPlan& P = *plan;
  P.H = H, P.W = W, P.Ho = s.Ho(H), P.Wo = s.Wo(W);
  if (P.Ho <= 0 || P.Wo <= 0) fail("EConv: the kernel does not fit the padded input");
  P.Hp = H + s.pt + s.pb;
  const int64_t Wp = W + s.pl + s.pr;
  // Stride 1, unless whole-vector rows waste nothing (Wo a multiple of the widest vector): rows as
  // padded, outputs on the padded grid (EConvPlan::flat). Rows of Wo outputs not a multiple of 16 pay
  // twice: lanes past Wo in every lookup, and tables built as wide as the last kernel offset's first
  // column + Wo rounded up to 16 (a 4 x 4 output of a 5 x 5 kernel: rows of 20 entries for 8 padded
  // columns). Flat ran as fast or faster at every such size of C++ timings on Zen 3 (AVX2; 4 x 4
  // to 24 x 24 outputs, 8 to 512 channels, 1 x 1 to 5 x 5 kernels, int8 and fp32 tables: 512 channels
  // of a 5 x 5 kernel at 4 x 4 1.43 -> 0.92 ms in int8, 256 at 5 x 5 0.51 -> 0.31 ms), rows at 16 and
  // 32 columns (8 channels of a 5 x 5 kernel at 32 x 32 in int8: 29 us rows, 49 us flat). Else columns
  // are stored split by phase (column mod stride), so every kernel offset reads its output row as one
  // contiguous run: offset j starts at column (j*dw)/sw of phase (j*dw)%sw. Rows are as wide as the
  // widest such run, in whole vectors of any instruction set.
  const IsaKernels& rows_isa = isa_forced ? *isa : fullest_vectors(*isa, P.Wo);
  P.flat = s.sh == 1 && s.sw == 1 && P.Wo % kMaxVec != 0;
  const int64_t first_max = (s.kw - 1) * s.dw / s.sw;
  P.width = P.flat ? Wp : std::max((Wp + s.sw - 1) / s.sw, first_max + round_up(P.Wo, kMaxVec));
  P.row = s.sw * P.width;
  const auto rows_in = [&](int64_t out_rows) { return (out_rows - 1) * s.sh + (s.kh - 1) * s.dh + 1; };
  const int64_t entry_bytes = s.table_bits / 8;
  const int64_t codeword_row_bytes = s.C * P.row * entry_bytes;
  // the most output rows whose tables (one segment, all codewords) fit the budget; at least one
  P.tile_rows = 1;
  while (P.tile_rows < P.Ho && rows_in(P.tile_rows + 1) * codeword_row_bytes <= table_budget_bytes()) ++P.tile_rows;
  P.tile_in_rows = rows_in(P.tile_rows);
  // flat: a tile's run of outputs, rounded up to whole vectors, reads up to (kw - 1) * dw entries past
  // its last input row's start
  const int64_t reach = P.flat ? (s.kw - 1) * s.dw + kMaxVec : 0;
  P.plane = round_up(P.tile_in_rows * P.row + reach, kMaxVec);
  P.out_plane = P.flat ? round_up(P.Ho * P.row, kMaxVec) + kMaxVec : 0;  // the last tile's run rounded up
  P.group = std::clamp<int64_t>(table_budget_bytes() / (s.C * P.plane * entry_bytes), 1, s.V);
  if (s.C * P.plane >= std::numeric_limits<int32_t>::max()) fail("EConv: a segment's tables are too large");
  const int64_t taps = s.kh * s.kw;
  // a run of the lookups reads kw - 1 entries past its own at stride 1, else a row's phases, and
  // kh - 1 rows below (EConvPlan::channels)
  const int64_t window = 2 * kMaxVec + (s.kh - 1) * s.dh * P.row + (s.sw == 1 ? (s.kw - 1) * s.dw : P.row);
  const int64_t segment_bytes = s.C * window * entry_bytes, l1 = cache_sizes().l1d;
  const std::string order = econv_order();
  P.channels = s.table_bits == 32 && (order.empty() ? taps > 1 && segment_bytes <= l1 : order == "channels");
  P.channel_segments = std::max<int64_t>(1, l1 / 2 / segment_bytes);
  P.offsets.resize(codes.size());
  for (int64_t ov = 0; ov < s.p * s.V; ++ov)
    for (int64_t i = 0; i < s.kh; ++i)
      for (int64_t j = 0; j < s.kw; ++j) {
        const int64_t t = i * s.kw + j;
        const int64_t tap = i * s.dh * P.row + (j * s.dw % s.sw) * P.width + j * s.dw / s.sw;
        P.offsets[ov * taps + t] = static_cast<int32_t>(codes[ov * taps + t] * P.plane + tap);
      }
  P.isa = P.flat ? isa : &rows_isa;  // flat runs waste under a vector a tile: the best set
  plans_.push_back(plan);
  return plan;
}

void econv(const EConvLayer& layer, const EConvPlan& plan, int64_t N, const float* x, const float* bias, float* y,
           const Parallel& parallel) {
  if (N < 0) fail("EConv: input must be [N, d, H, W]");
  if (N > 0) plan.isa->econv(layer, plan, N, x, bias, y, parallel);
}

// ---------------------------------------------------------------------------------------------
// EFC

template <typename Code>
void pack_efc(EFCLayer& layer, const EFCParams& s, int64_t Vc, const float* codebook, const Code* codes,
              const std::string& isa) {
  check_codebook(Vc, s.C, s.r, s.V, s.d, "EFC");
  if (s.out <= 0) fail("EFC: codes must be [V, out] with positive sizes");
  check_table_bits(s.table_bits, "EFC");
  check_codes(codes, s.V * s.out, s.C, "EFC");
  layer.isa = &choose_isa(isa);
  layer.s = s;
  layer.Cp = s.C <= 16 ? 16 : s.C <= 32 ? 32 : round_up(s.C, kMaxVec);  // up to 64: whole register pairs
  layer.codebook_t.assign(static_cast<size_t>(s.V * s.r * layer.Cp), 0.0f);
  for (int64_t v = 0; v < s.V; ++v)
    for (int64_t c = 0; c < s.C; ++c)
      for (int64_t k = 0; k < s.r; ++k)
        layer.codebook_t[(v * s.r + k) * layer.Cp + c] = codebook[(v * s.C + c) * s.r + k];
  // [V][out] -> [out][V]: an output's codes are contiguous
  layer.codes8.clear();
  layer.codes16.clear();
  const auto transpose = [&](auto& dst) {
    dst.resize(static_cast<size_t>(s.out * s.V));
    for (int64_t v = 0; v < s.V; ++v)
      for (int64_t o = 0; o < s.out; ++o) dst[o * s.V + v] = static_cast<typename std::decay_t<decltype(dst)>::value_type>(codes[v * s.out + o]);
  };
  if (s.C <= 256)
    transpose(layer.codes8);
  else
    transpose(layer.codes16);
  layer.codes_vo.clear();
  layer.codes_blocks.clear();
  if (s.table_bits == 32 && layer.isa->register_tables && s.C <= 64) layer.codes_vo.assign(codes, codes + s.V * s.out);
  if (s.table_bits == 8 && layer.isa->shuffle_tables && s.C <= 64) {
    layer.codes_blocks.assign(static_cast<size_t>(round_up(s.out, 32) * s.V), 0);
    for (int64_t v = 0; v < s.V; ++v)
      for (int64_t o = 0; o < s.out; ++o)
        layer.codes_blocks[((o / 32) * s.V + v) * 32 + o % 32] = static_cast<uint8_t>(codes[v * s.out + o]);
  }
  layer.seg_bound = s.table_bits == 32 ? std::vector<float>() : segment_bounds(codebook, s.V, s.C, s.r, s.d);
}

void efc(const EFCLayer& layer, int64_t N, const float* x, const float* bias, float* y, const Parallel& parallel) {
  if (N < 0) fail("EFC: input must be [N, d]");
  if (N > 0) layer.isa->efc(layer, N, x, bias, y, parallel);
}

template void pack_econv<uint8_t>(EConvLayer&, const EConvParams&, int64_t, const float*, const uint8_t*,
                                  const std::string&);
template void pack_econv<uint16_t>(EConvLayer&, const EConvParams&, int64_t, const float*, const uint16_t*,
                                   const std::string&);
template void pack_efc<uint8_t>(EFCLayer&, const EFCParams&, int64_t, const float*, const uint8_t*,
                                const std::string&);
template void pack_efc<uint16_t>(EFCLayer&, const EFCParams&, int64_t, const float*, const uint16_t*,
                                 const std::string&);

}  // namespace onnxmerge
