// The arithmetic of onnxmerge's ai.onnxmerge ops EConv and EFC (NeuralMerger eq. 9), with no
// onnxruntime dependency: lookup tables of codeword dot products, then sums of table entries picked
// by the code indices. DESIGN.md, "Kernels"; the numpy oracle is onnxmerge.lookup_ops.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <vector>

namespace onnxmerge {

// Shapes of one call. Codebook [Vc, C, r] (Vc = V' >= V); only its first V segments are read.
struct CodebookShape {
  int64_t Vc = 0, C = 0, r = 0;
};

struct EConvShape {
  int64_t N = 0, d = 0, H = 0, W = 0;           // X [N, d, H, W]
  CodebookShape cb;                              // codebook [Vc, C, r]
  int64_t V = 0, p = 0, kh = 0, kw = 0;          // codes [V, p, kh, kw]
  int64_t sh = 1, sw = 1;                        // strides
  int64_t pt = 0, pl = 0, pb = 0, pr = 0;        // pads, ONNX order [top, left, bottom, right]
  int64_t dh = 1, dw = 1;                        // dilations
  int64_t Ho() const { return (H + pt + pb - dh * (kh - 1) - 1) / sh + 1; }
  int64_t Wo() const { return (W + pl + pr - dw * (kw - 1) - 1) / sw + 1; }
};

struct EFCShape {
  int64_t N = 0, d = 0;     // X [N, d]
  CodebookShape cb;         // codebook [Vc, C, r]
  int64_t V = 0, out = 0;   // codes [V, out]
};

// Throw std::invalid_argument with a one-line reason when the shapes do not fit together.
void check(const EConvShape& s);
void check(const EFCShape& s);

// Y [N, p, Ho, Wo] = EConv(X, codebook, codes, bias); bias may be null ([p] otherwise).
// Code indices >= C are reported with std::invalid_argument.
template <typename Code>
void econv(const EConvShape& s, const float* x, const float* codebook, const Code* codes, const float* bias,
           float* y);

// Y [N, out] = EFC(X, codebook, codes, bias); bias may be null ([out] otherwise).
template <typename Code>
void efc(const EFCShape& s, const float* x, const float* codebook, const Code* codes, const float* bias, float* y);

extern template void econv<uint8_t>(const EConvShape&, const float*, const float*, const uint8_t*, const float*,
                                    float*);
extern template void econv<uint16_t>(const EConvShape&, const float*, const float*, const uint16_t*, const float*,
                                     float*);
extern template void efc<uint8_t>(const EFCShape&, const float*, const float*, const uint8_t*, const float*, float*);
extern template void efc<uint16_t>(const EFCShape&, const float*, const float*, const uint16_t*, const float*,
                                   float*);

}  // namespace onnxmerge
