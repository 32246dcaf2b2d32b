// The arithmetic of onnxmerge's ai.onnxmerge ops EConv and EFC (NeuralMerger eq. 9), with no
// onnxruntime dependency: lookup tables of codeword dot products (eq. 8's inner products, computed once
// per segment and codeword), then sums of table entries picked by the code indices. DESIGN.md,
// "Kernels"; the numpy oracle is onnxmerge.lookup_ops.
//
// A layer's constant inputs (codebook, codes) are checked and repacked once, when onnxruntime creates
// the kernel (`pack_econv`, `pack_efc`); each run then only reads the input. The hot loops are in
// lookup_impl.cc, compiled once per instruction set (on x86-64: generic x86-64, AVX2+FMA, AVX-512; on
// aarch64: generic and NEON; elsewhere generic) and chosen at run time from the CPU's features
// (`choose_isa`).
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

namespace onnxmerge {

// Runs fn(0) .. fn(total - 1), possibly in parallel (onnxruntime's intra-op thread pool in the custom
// op). The default runs them in order on the calling thread. Every item writes disjoint outputs.
struct Parallel {
  virtual ~Parallel() = default;
  virtual void run(size_t total, const std::function<void(size_t)>& fn) const {
    for (size_t i = 0; i < total; ++i) fn(i);
  }
};

// ---------------------------------------------------------------------------------------------
// EConv: Y [N, p, Ho, Wo] from X [N, d, H, W], codebook [V', C, r], codes [V, p, kh, kw], bias [p]

struct EConvParams {
  int64_t d = 0, p = 0, kh = 0, kw = 0;     // input channels, output channels, kernel
  int64_t V = 0, C = 0, r = 0;              // segments, codewords, segment depth
  int64_t sh = 1, sw = 1;                   // strides
  int64_t pt = 0, pl = 0, pb = 0, pr = 0;   // pads, ONNX order [top, left, bottom, right]
  int64_t dh = 1, dw = 1;                   // dilations
  int64_t table_bits = 32;                  // table entries: 32 = float; 16 / 8 = integers with a scale
                                            // per (sample, segment), see EConvLayer::seg_bound
  int64_t Ho(int64_t H) const { return (H + pt + pb - dh * (kh - 1) - 1) / sh + 1; }
  int64_t Wo(int64_t W) const { return (W + pl + pr - dw * (kw - 1) - 1) / sw + 1; }
};

struct IsaKernels;

// The widest vector of any instruction set, in floats: table planes and flat runs of outputs are
// rounded up to it, so a run may be computed in whole vectors of any set.
constexpr int64_t kMaxVec = 16;

// What a layer's runs work in (lookup_impl.cc's scratch sets: padded input, tables, outputs), kept
// from run to run, one set per sample run at once: allocating and zeroing them each run cost more than
// small layers' lookups. A pool holds sets of one type (its layer's table precision fixes it).
struct ScratchPool {
  std::mutex lock;
  std::vector<std::shared_ptr<void>> sets;
};

// Where each (output channel, segment, kernel offset) reads its table plane, for one input size.
struct EConvPlan {
  int64_t H = 0, W = 0, Ho = 0, Wo = 0, Hp = 0;
  // Stride 1 (`flat`): outputs are computed on the padded grid, row after row as one run of vectors
  // (output (a, b) at a * row + b; the row's last row - Wo entries are discarded), so a kernel offset
  // reads one contiguous run of table entries for a whole tile, and vectors are full however narrow
  // the rows. Other strides: each output row is its own run of whole vectors, columns split by phase.
  bool flat = false;
  int64_t width = 0;          // entries per row and column phase: flat, the padded row; else the padded
                              // row's phase, and the last kernel offset's first column + Wo rounded up to
                              // a vector of 16
  int64_t row = 0;            // entries per padded input row: sw phases of `width`
  int64_t out_plane = 0;      // flat: entries per output channel of the outputs on the padded grid
  int64_t tile_rows = 0;      // output rows per tile, so that a segment group's tables stay in cache
  int64_t tile_in_rows = 0;   // padded input rows a tile reads
  int64_t plane = 0;          // entries per table plane (one codeword): tile_in_rows * row, rounded up to 16
  int64_t group = 0;          // segments whose tables are built together
  // Float tables, kernels of several offsets, where one segment's tables over the input rows that a
  // run of 2 * kMaxVec outputs reads fit L1: the lookups run segment by segment (a few at a time,
  // `channel_segments`, what fits half of L1) for every output channel, a run of positions after
  // another, rather than each output channel over all of a group's segments (econv_sample)
  bool channels = false;
  int64_t channel_segments = 1;
  std::vector<int32_t> offsets;  // [p][V][kh*kw]: code * plane + the kernel offset's row / phase / column
  const IsaKernels* isa = nullptr;  // the instruction set this input size runs (see EConvLayer::plan)
  mutable ScratchPool scratch;  // lookup_impl.cc's EConvScratch of `isa`
};

struct EConvLayer {
  EConvParams s;
  const IsaKernels* isa = nullptr;  // set by pack_econv
  bool isa_forced = false;          // named by the caller (ONNXMERGE_KERNEL_ISA): every plan uses it
  std::vector<float> codebook;   // [V][C][r] (the first V segments of [V', C, r])
  std::vector<uint16_t> codes;   // [p][V][kh*kw], checked < C
  // Integer tables (table_bits 16 or 8, Q = 32767 or 127): segment v's entries for a sample are
  // rint(T / s) with s = 2^e, the least power of two with seg_bound[v] * max|x_v| <= Q * s, where x_v
  // is the sample's channels of segment v; the bound holds for every entry (|<w, x>| <= ||w||_1 max|x|),
  // so the scale needs no pass over the tables and is the same for every tile. A power of two keeps
  // the scaling exact. The lookups add a segment's entries as integers and scale the sum once.
  std::vector<float> seg_bound;  // [V]: max over codewords of sum_k |w_k| (k < the segment's depth)

  // the plan for an H x W input, made once per size and kept (thread-safe)
  std::shared_ptr<const EConvPlan> plan(int64_t H, int64_t W) const;

  mutable std::mutex lock_;                                       // guards plans_
  mutable std::vector<std::shared_ptr<const EConvPlan>> plans_;
};

// ---------------------------------------------------------------------------------------------
// EFC: Y [N, out] from X [N, d], codebook [V', C, r], codes [V, out], bias [out]

// This CPU's per-core data caches, read once at run time (Linux sysfs, else sysconf, else 32 KiB / 1 MiB,
// the Zen 4 core the block sizes were first measured on); ONNXMERGE_L1D_BYTES / ONNXMERGE_L2_BYTES
// override them. Table blocks are sized from these, so that they fit the cache of the machine the
// session runs on, not of the one the kernels were tuned on.
struct CacheSizes {
  int64_t l1d = 0, l2 = 0;
  std::string source;  // where the figures came from
};
const CacheSizes& cache_sizes();

struct EFCParams {
  int64_t d = 0, out = 0, V = 0, C = 0, r = 0;
  int64_t table_bits = 32;  // as EConvParams::table_bits (EFC is EConv's 1x1 kernel on one pixel)
};

struct EFCLayer {
  EFCParams s;
  const IsaKernels* isa = nullptr;  // set by pack_efc
  int64_t Cp = 0;                   // table row length: C rounded up to 16, 32, 64, then multiples of 16
  std::vector<float> codebook_t;    // [V][r][Cp]: the k-th components of a segment's codewords, contiguous
  // [out][V], checked < C: one byte per code when C <= 256 (less to stream at batch 1), else two
  std::vector<uint8_t> codes8;
  std::vector<uint16_t> codes16;
  std::vector<uint8_t> codes_vo;    // [V][out], for instruction sets with register_tables and C <= 64
  // int8 tables, C <= 64 and shuffle_tables: [ceil(out / 32)][V][32], the codes of 32 outputs for each
  // segment in turn (the last block padded with code 0), so that a block's codes stream contiguously:
  // rows of [V][out] are a page apart at out = 4096, and reading 32 bytes of each thrashed the TLB
  std::vector<uint8_t> codes_blocks;
  std::vector<float> seg_bound;     // integer tables: as EConvLayer::seg_bound
  mutable ScratchPool scratch;      // integer tables at any batch, float ones below 4 samples
};

// Check shapes and code indices and repack for the instruction set `isa` (see choose_isa);
// std::invalid_argument with a one-line reason otherwise. codebook is [Vc, C, r]; codes [V, p, kh, kw]
// (EConv) or [V, out] (EFC).
template <typename Code>
void pack_econv(EConvLayer& layer, const EConvParams& s, int64_t Vc, const float* codebook, const Code* codes,
                const std::string& isa = "");
template <typename Code>
void pack_efc(EFCLayer& layer, const EFCParams& s, int64_t Vc, const float* codebook, const Code* codes,
              const std::string& isa = "");

// ---------------------------------------------------------------------------------------------
// the runs, on the instruction set the layer was packed for

// X is [N, d, plan.H, plan.W] (plan from layer.plan, which also gives the output's Ho, Wo)
void econv(const EConvLayer& layer, const EConvPlan& plan, int64_t N, const float* x, const float* bias, float* y,
           const Parallel& parallel = Parallel());
void efc(const EFCLayer& layer, int64_t N, const float* x, const float* bias, float* y,
         const Parallel& parallel = Parallel());

// The hot loops of one instruction set (lookup_impl.cc, compiled once per set).
struct IsaKernels {
  const char* name;
  void (*econv)(const EConvLayer&, const EConvPlan&, int64_t N, const float* x, const float* bias, float* y,
                const Parallel&);
  void (*efc)(const EFCLayer&, int64_t N, const float* x, const float* bias, float* y, const Parallel&);
  bool register_tables;  // EFC looks tables of <= 64 codewords up in registers at batch 1 (codes_vo)
  bool shuffle_tables;   // EFC looks int8 tables of <= 64 codewords up by byte shuffles (codes_blocks)
  int vec;               // floats per vector (ONNXMERGE_VEC)
};

// The instruction sets this build has code for, best first ("avx512", "avx2", "generic" on x86-64;
// "neon", "generic" on aarch64; "generic" elsewhere), and whether this CPU runs one.
std::vector<std::string> built_isas();
bool cpu_supports(const std::string& isa);
// The kernels of `isa`; "" means the best this CPU runs. std::invalid_argument if `isa` is unknown or
// this CPU lacks it.
const IsaKernels& choose_isa(const std::string& isa);

}  // namespace onnxmerge
