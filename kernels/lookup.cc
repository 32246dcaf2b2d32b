// EConv / EFC by lookup tables (NeuralMerger eq. 9); see lookup.h. A first, scalar, single-threaded
// cut: correct before fast. Every hot loop is a contiguous multiply-add or add over pixels (EConv)
// or over the batch (EFC), so the compiler vectorises it with plain loads, no gathers.
#include "lookup.h"

#include <algorithm>
#include <cstring>
#include <string>

namespace onnxmerge {
namespace {

void fail(const std::string& what) { throw std::invalid_argument(what); }

void check_codebook(const CodebookShape& cb, int64_t V, int64_t d, const char* op) {
  const std::string name(op);
  if (cb.Vc <= 0 || cb.C <= 0 || cb.r <= 0) fail(name + ": codebook must be [V', C, r] with positive sizes");
  if (V <= 0) fail(name + ": codes have no segments");
  if (V > cb.Vc)
    fail(name + ": codes have " + std::to_string(V) + " segments but the codebook only " + std::to_string(cb.Vc));
  if (d > V * cb.r || d <= 0)
    fail(name + ": input depth " + std::to_string(d) + " does not fit " + std::to_string(V) + " segments of " +
         std::to_string(cb.r));
}

template <typename Code>
void check_codes(const Code* codes, int64_t count, int64_t C, const char* op) {
  Code top = 0;
  for (int64_t k = 0; k < count; ++k) top = std::max(top, codes[k]);
  if (count > 0 && static_cast<int64_t>(top) >= C)
    fail(std::string(op) + ": code index " + std::to_string(top) + " out of range for a codebook of " +
         std::to_string(C) + " codewords");
}

}  // namespace

void check(const EConvShape& s) {
  check_codebook(s.cb, s.V, s.d, "EConv");
  if (s.N < 0 || s.H <= 0 || s.W <= 0) fail("EConv: input must be [N, d, H, W] with positive H, W");
  if (s.p <= 0 || s.kh <= 0 || s.kw <= 0) fail("EConv: codes must be [V, p, kh, kw] with positive sizes");
  if (s.sh <= 0 || s.sw <= 0 || s.dh <= 0 || s.dw <= 0) fail("EConv: strides and dilations must be positive");
  if (s.pt < 0 || s.pl < 0 || s.pb < 0 || s.pr < 0) fail("EConv: pads must be non-negative");
  if (s.Ho() <= 0 || s.Wo() <= 0) fail("EConv: the kernel does not fit the padded input");
}

void check(const EFCShape& s) {
  check_codebook(s.cb, s.V, s.d, "EFC");
  if (s.N < 0) fail("EFC: input must be [N, d]");
  if (s.out <= 0) fail("EFC: codes must be [V, out] with positive sizes");
}

template <typename Code>
void econv(const EConvShape& s, const float* x, const float* codebook, const Code* codes, const float* bias,
           float* y) {
  check(s);
  check_codes(codes, s.V * s.p * s.kh * s.kw, s.cb.C, "EConv");
  const int64_t C = s.cb.C, r = s.cb.r;
  const int64_t Hp = s.H + s.pt + s.pb, Wp = s.W + s.pl + s.pr, P = Hp * Wp;
  const int64_t Ho = s.Ho(), Wo = s.Wo(), HWo = Ho * Wo, HW = s.H * s.W;
  const int64_t taps = s.kh * s.kw;

  std::vector<float> xseg(static_cast<size_t>(r * P));   // one segment of the padded input [r][Hp][Wp]
  std::vector<float> table(static_cast<size_t>(C * P));  // T[c][Hp][Wp] of that segment

  for (int64_t n = 0; n < s.N; ++n) {
    const float* xn = x + n * s.d * HW;
    float* yn = y + n * s.p * HWo;
    for (int64_t o = 0; o < s.p; ++o) std::fill(yn + o * HWo, yn + (o + 1) * HWo, bias ? bias[o] : 0.0f);

    for (int64_t v = 0; v < s.V; ++v) {
      // channels of this segment present in x (the rest are zero padding)
      const int64_t depth = std::max<int64_t>(0, std::min(r, s.d - v * r));
      // the segment's channels on the padded grid (pad pixels stay zero)
      std::fill(xseg.begin(), xseg.begin() + depth * P, 0.0f);
      for (int64_t k = 0; k < depth; ++k) {
        const float* src = xn + (v * r + k) * HW;
        float* dst = xseg.data() + k * P;
        for (int64_t h = 0; h < s.H; ++h)
          std::memcpy(dst + (h + s.pt) * Wp + s.pl, src + h * s.W, sizeof(float) * static_cast<size_t>(s.W));
      }
      // lookup tables: T[c][q] = <codeword c of segment v, x segment at pixel q>
      const float* cbv = codebook + v * C * r;
      for (int64_t c = 0; c < C; ++c) {
        float* t = table.data() + c * P;
        const float* w = cbv + c * r;
        if (depth == 0) {
          std::fill(t, t + P, 0.0f);
          continue;
        }
        const float w0 = w[0];
        const float* x0 = xseg.data();
        for (int64_t q = 0; q < P; ++q) t[q] = w0 * x0[q];
        for (int64_t k = 1; k < depth; ++k) {
          const float wk = w[k];
          const float* xk = xseg.data() + k * P;
          for (int64_t q = 0; q < P; ++q) t[q] += wk * xk[q];
        }
      }
      // each output adds, per kernel offset, the table plane its code picks, shifted: contiguous adds
      const Code* cv = codes + v * s.p * taps;
      for (int64_t o = 0; o < s.p; ++o) {
        float* yo = yn + o * HWo;
        for (int64_t i = 0; i < s.kh; ++i) {
          for (int64_t j = 0; j < s.kw; ++j) {
            const float* plane = table.data() + static_cast<int64_t>(cv[(o * s.kh + i) * s.kw + j]) * P;
            for (int64_t a = 0; a < Ho; ++a) {
              const float* src = plane + (a * s.sh + i * s.dh) * Wp + j * s.dw;
              float* dst = yo + a * Wo;
              if (s.sw == 1) {
                for (int64_t b = 0; b < Wo; ++b) dst[b] += src[b];
              } else {
                const int64_t sw = s.sw;
                for (int64_t b = 0; b < Wo; ++b) dst[b] += src[b * sw];
              }
            }
          }
        }
      }
    }
  }
}

template <typename Code>
void efc(const EFCShape& s, const float* x, const float* codebook, const Code* codes, const float* bias, float* y) {
  check(s);
  check_codes(codes, s.V * s.out, s.cb.C, "EFC");
  const int64_t C = s.cb.C, r = s.cb.r, N = s.N;
  if (N == 0) return;
  // tables laid out [segment][codeword][sample]: the per-(output, segment) add is contiguous over the batch
  std::vector<float> table(static_cast<size_t>(s.V * C * N));
  for (int64_t v = 0; v < s.V; ++v) {
    const int64_t depth = std::max<int64_t>(0, std::min(r, s.d - v * r));
    for (int64_t c = 0; c < C; ++c) {
      const float* w = codebook + (v * C + c) * r;
      float* t = table.data() + (v * C + c) * N;
      for (int64_t n = 0; n < N; ++n) {
        const float* xs = x + n * s.d + v * r;
        float acc = 0.0f;
        for (int64_t k = 0; k < depth; ++k) acc += w[k] * xs[k];
        t[n] = acc;
      }
    }
  }
  std::vector<float> acc(static_cast<size_t>(s.out * N));  // [out][N]
  for (int64_t o = 0; o < s.out; ++o) std::fill(acc.begin() + o * N, acc.begin() + (o + 1) * N, bias ? bias[o] : 0.0f);
  for (int64_t v = 0; v < s.V; ++v) {
    const Code* cv = codes + v * s.out;
    const float* tv = table.data() + v * C * N;
    for (int64_t o = 0; o < s.out; ++o) {
      const float* row = tv + static_cast<int64_t>(cv[o]) * N;
      float* dst = acc.data() + o * N;
      for (int64_t n = 0; n < N; ++n) dst[n] += row[n];
    }
  }
  for (int64_t n = 0; n < N; ++n)
    for (int64_t o = 0; o < s.out; ++o) y[n * s.out + o] = acc[o * N + n];
}

template void econv<uint8_t>(const EConvShape&, const float*, const float*, const uint8_t*, const float*, float*);
template void econv<uint16_t>(const EConvShape&, const float*, const float*, const uint16_t*, const float*, float*);
template void efc<uint8_t>(const EFCShape&, const float*, const float*, const uint8_t*, const float*, float*);
template void efc<uint16_t>(const EFCShape&, const float*, const float*, const uint16_t*, const float*, float*);

}  // namespace onnxmerge
