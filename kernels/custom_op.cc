// onnxruntime registration of the ai.onnxmerge ops (EConv, EFC), version 1: a thin layer over the
// arithmetic in lookup.h. Built against onnxruntime's C/C++ headers only; onnxruntime hands the API
// pointer to RegisterCustomOps, so the library does not link libonnxruntime.
//
// When the codebook and the codes are initializers (as onnxmerge writes them), a kernel checks and
// repacks them once, when the session creates it; otherwise on every run. The environment variable
// ONNXMERGE_KERNEL_ISA (avx512, avx2, generic), read when a kernel is created, forces an instruction
// set instead of the best one this CPU runs (for tests and benchmarks).
#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT

#include <cstdlib>
#include <exception>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "lookup.h"

#define ONNXMERGE_EXPORT extern "C" __attribute__((visibility("default")))

namespace {

constexpr const char* kDomain = "ai.onnxmerge";

// Run `fn`, turning any exception into an onnxruntime status (exceptions must not cross the C ABI).
template <typename F>
OrtStatusPtr guarded(F&& fn) {
  try {
    fn();
    return nullptr;
  } catch (const Ort::Exception& e) {
    return Ort::Status(e.what(), e.GetOrtErrorCode()).release();
  } catch (const std::invalid_argument& e) {
    return Ort::Status(e.what(), ORT_INVALID_ARGUMENT).release();
  } catch (const std::exception& e) {
    return Ort::Status(e.what(), ORT_RUNTIME_EXCEPTION).release();
  } catch (...) {
    return Ort::Status("ai.onnxmerge: unknown error", ORT_RUNTIME_EXCEPTION).release();
  }
}

[[noreturn]] void fail(const std::string& what) { throw std::invalid_argument(what); }

// (a message as a C string: run-time checks build no std::string unless they fail)
void expect(bool ok, const char* what) {
  if (!ok) fail(what);
}

std::vector<int64_t> ints(const Ort::ConstKernelInfo& info, const char* name, std::vector<int64_t> fallback) {
  try {
    return info.GetAttributes<int64_t>(name);
  } catch (const Ort::Exception&) {
    return fallback;  // attribute absent
  }
}

int64_t int_or(const Ort::ConstKernelInfo& info, const char* name, int64_t fallback) {
  try {
    return info.GetAttribute<int64_t>(name);
  } catch (const Ort::Exception&) {
    return fallback;  // attribute absent
  }
}

std::string forced_isa() {
  const char* isa = std::getenv("ONNXMERGE_KERNEL_ISA");
  return isa ? isa : "";
}

std::vector<int64_t> shape(const Ort::ConstValue& value) { return value.GetTensorTypeAndShapeInfo().GetShape(); }

// fn(const Code* codes) with the codes' element type, uint8 or uint16 (the only two onnxmerge writes)
template <typename F>
void with_codes(const Ort::ConstValue& codes, const char* op, F&& fn) {
  const auto type = codes.GetTensorTypeAndShapeInfo().GetElementType();
  if (type == ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8)
    fn(codes.GetTensorData<uint8_t>());
  else if (type == ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT16)
    fn(codes.GetTensorData<uint16_t>());
  else
    throw std::invalid_argument(std::string(op) + ": codes must be uint8 or uint16");
}

// The intra-op thread pool of the session, through the custom-op API.
struct OrtParallel : onnxmerge::Parallel {
  explicit OrtParallel(const Ort::KernelContext& ctx) : ctx_(ctx) {}
  void run(size_t total, const std::function<void(size_t)>& fn) const override {
    if (total <= 1) {
      if (total == 1) fn(0);
      return;
    }
    ctx_.ParallelFor(&call, total, 0, const_cast<std::function<void(size_t)>*>(&fn));
  }

 private:
  static void call(void* fn, size_t i) { (*static_cast<const std::function<void(size_t)>*>(fn))(i); }
  const Ort::KernelContext& ctx_;
};

// What both ops share: the layer packed at creation when its codebook and codes are constant, else
// packed on each run from the inputs; and the optional bias.
template <typename Layer, typename Derived>
struct LookupKernel {
  std::string isa = forced_isa();
  std::unique_ptr<Layer> constant;

  void pack_constant(const OrtKernelInfo* info_ptr) {
    Ort::ConstKernelInfo info(info_ptr);
    int codebook_constant = 0, codes_constant = 0;
    Ort::ConstValue codebook = info.GetTensorConstantInput(1, &codebook_constant);
    Ort::ConstValue codes = info.GetTensorConstantInput(2, &codes_constant);
    if (codebook_constant && codes_constant) {
      constant = std::make_unique<Layer>();
      static_cast<Derived*>(this)->pack(*constant, codebook, codes);
    }
  }

  // the packed layer of this run: the constant one, or `local` packed from the inputs
  const Layer& layer(Ort::KernelContext& ctx, std::unique_ptr<Layer>& local) {
    if (constant) return *constant;
    local = std::make_unique<Layer>();
    static_cast<Derived*>(this)->pack(*local, ctx.GetInput(1), ctx.GetInput(2));
    return *local;
  }

  // X and its shape: `rank` dims [N, depth, ...], depth as the node's attribute says
  static std::pair<Ort::ConstValue, std::vector<int64_t>> input(Ort::KernelContext& ctx, size_t rank, int64_t depth,
                                                                const std::string& op, const char* layout,
                                                                const char* unit, const char* attribute) {
    Ort::ConstValue x = ctx.GetInput(0);
    auto xs = shape(x);
    if (xs.size() != rank) fail(op + ": input must be " + layout);
    if (xs[1] != depth)
      fail(op + ": input has " + std::to_string(xs[1]) + " " + unit + ", " + attribute + " is " + std::to_string(depth));
    return {x, xs};
  }

  static const float* bias(Ort::KernelContext& ctx, int64_t channels, const char* op) {
    if (ctx.GetInputCount() < 4) return nullptr;
    Ort::ConstValue b = ctx.GetInput(3);
    if (!b) return nullptr;
    const auto s = shape(b);
    if (s.size() != 1 || s[0] != channels) fail(std::string(op) + ": bias must be 1-D with one value per output channel");
    return b.GetTensorData<float>();
  }
};

// ---------------------------------------------------------------------------------------------
// EConv

struct EConvKernel : LookupKernel<onnxmerge::EConvLayer, EConvKernel> {
  onnxmerge::EConvParams attrs;  // from the node's attributes: d, strides, pads, dilations, table_bits
  std::vector<int64_t> kernel_shape;

  explicit EConvKernel(const OrtKernelInfo* info_ptr) {
    Ort::ConstKernelInfo info(info_ptr);
    attrs.d = info.GetAttribute<int64_t>("in_channels");
    kernel_shape = ints(info, "kernel_shape", {});
    const auto strides = ints(info, "strides", {1, 1});
    const auto pads = ints(info, "pads", {0, 0, 0, 0});
    const auto dilations = ints(info, "dilations", {1, 1});
    expect(strides.size() == 2, "EConv: strides must have 2 values");
    expect(pads.size() == 4, "EConv: pads must have 4 values");
    expect(dilations.size() == 2, "EConv: dilations must have 2 values");
    expect(kernel_shape.empty() || kernel_shape.size() == 2, "EConv: kernel_shape must have 2 values");
    attrs.sh = strides[0], attrs.sw = strides[1];
    attrs.pt = pads[0], attrs.pl = pads[1], attrs.pb = pads[2], attrs.pr = pads[3];
    attrs.dh = dilations[0], attrs.dw = dilations[1];
    attrs.table_bits = int_or(info, "table_bits", 32);  // checked by pack_econv
    pack_constant(info_ptr);
  }

  void pack(onnxmerge::EConvLayer& layer, const Ort::ConstValue& codebook, const Ort::ConstValue& codes) const {
    const auto cbs = shape(codebook), cs = shape(codes);
    expect(cbs.size() == 3, "EConv: codebook must be 3-D [V', C, r]");
    expect(cs.size() == 4, "EConv: codes must be 4-D [V, p, kh, kw]");
    expect(kernel_shape.empty() || (kernel_shape[0] == cs[2] && kernel_shape[1] == cs[3]),
           "EConv: kernel_shape does not match the codes' shape");
    onnxmerge::EConvParams s = attrs;
    s.V = cs[0], s.p = cs[1], s.kh = cs[2], s.kw = cs[3];
    s.C = cbs[1], s.r = cbs[2];
    with_codes(codes, "EConv", [&](const auto* c) {
      onnxmerge::pack_econv(layer, s, cbs[0], codebook.GetTensorData<float>(), c, isa);
    });
  }

  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    return guarded([&] {
      Ort::KernelContext ctx(context);
      const auto [x, xs] = input(ctx, 4, attrs.d, "EConv", "4-D [N, d, H, W]", "channels", "in_channels");
      std::unique_ptr<onnxmerge::EConvLayer> local;
      const onnxmerge::EConvLayer& L = layer(ctx, local);
      const float* b = bias(ctx, L.s.p, "EConv");
      const auto plan = L.plan(xs[2], xs[3]);  // checks that the kernel fits the input
      auto y = ctx.GetOutput(0, {xs[0], L.s.p, plan->Ho, plan->Wo});
      onnxmerge::econv(L, *plan, xs[0], x.GetTensorData<float>(), b, y.GetTensorMutableData<float>(),
                       OrtParallel(ctx));
    });
  }
};

// ---------------------------------------------------------------------------------------------
// EFC

struct EFCKernel : LookupKernel<onnxmerge::EFCLayer, EFCKernel> {
  int64_t in_features, table_bits;

  explicit EFCKernel(const OrtKernelInfo* info_ptr) {
    Ort::ConstKernelInfo info(info_ptr);
    in_features = info.GetAttribute<int64_t>("in_features");
    table_bits = int_or(info, "table_bits", 32);  // checked by pack_efc
    pack_constant(info_ptr);
  }

  void pack(onnxmerge::EFCLayer& layer, const Ort::ConstValue& codebook, const Ort::ConstValue& codes) const {
    const auto cbs = shape(codebook), cs = shape(codes);
    expect(cbs.size() == 3, "EFC: codebook must be 3-D [V', C, r]");
    expect(cs.size() == 2, "EFC: codes must be 2-D [V, out]");
    onnxmerge::EFCParams s{in_features, cs[1], cs[0], cbs[1], cbs[2], table_bits};
    with_codes(codes, "EFC", [&](const auto* c) {
      onnxmerge::pack_efc(layer, s, cbs[0], codebook.GetTensorData<float>(), c, isa);
    });
  }

  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    return guarded([&] {
      Ort::KernelContext ctx(context);
      const auto [x, xs] = input(ctx, 2, in_features, "EFC", "2-D [N, d]", "features", "in_features");
      std::unique_ptr<onnxmerge::EFCLayer> local;
      const onnxmerge::EFCLayer& L = layer(ctx, local);
      const float* b = bias(ctx, L.s.out, "EFC");
      auto y = ctx.GetOutput(0, {xs[0], L.s.out});
      onnxmerge::efc(L, xs[0], x.GetTensorData<float>(), b, y.GetTensorMutableData<float>(), OrtParallel(ctx));
    });
  }
};

// ---------------------------------------------------------------------------------------------
// the op descriptions: inputs X (float), codebook (float), codes (uint8 | uint16: any type here,
// checked when packed), B (float, optional); output Y (float)

template <typename Kernel>
struct LookupOp : Ort::CustomOpBase<LookupOp<Kernel>, Kernel, true> {
  explicit LookupOp(const char* name) : name_(name) {}

  OrtStatusPtr CreateKernelV2(const OrtApi& /*api*/, const OrtKernelInfo* info, void** kernel) const {
    *kernel = nullptr;
    return guarded([&] { *kernel = new Kernel(info); });
  }
  const char* GetName() const { return name_; }
  size_t GetInputTypeCount() const { return 4; }
  ONNXTensorElementDataType GetInputType(size_t index) const {
    return index == 2 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t index) const {
    return index == 3 ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t /*index*/) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }

 private:
  const char* name_;
};

}  // namespace

ONNXMERGE_EXPORT OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (api == nullptr) return nullptr;  // onnxruntime older than the headers: nothing can be reported through it
  Ort::InitApi(api);
  // the op descriptions must outlive every session that uses them
  static LookupOp<EConvKernel> econv_op("EConv");
  static LookupOp<EFCKernel> efc_op("EFC");
  return guarded([&] {
    Ort::CustomOpDomain domain(kDomain);
    domain.Add(&econv_op);
    domain.Add(&efc_op);
    Ort::UnownedSessionOptions(options).Add(domain);
    // the domain must outlive the sessions too: keep it alive for the life of the process
    static std::mutex lock;
    static std::vector<Ort::CustomOpDomain> domains;
    std::lock_guard<std::mutex> guard(lock);
    domains.push_back(std::move(domain));
  });
}

// For onnxmerge.kernels (ctypes): the instruction sets of this build that this CPU runs, best first and
// comma-separated; kernels use the first unless ONNXMERGE_KERNEL_ISA names another.
ONNXMERGE_EXPORT const char* onnxmerge_kernels_isas() {
  static const std::string names = [] {
    std::string all;
    for (const auto& name : onnxmerge::built_isas())
      if (onnxmerge::cpu_supports(name)) all += (all.empty() ? "" : ",") + name;
    return all;
  }();
  return names.c_str();
}

// For onnxmerge.kernels (ctypes): the cache sizes the kernels size their table blocks by,
// "l1d_bytes,l2_bytes,source" (source: sysfs, sysconf, environment or defaults).
ONNXMERGE_EXPORT const char* onnxmerge_kernels_caches() {
  static const std::string text = [] {
    const auto& c = onnxmerge::cache_sizes();
    return std::to_string(c.l1d) + "," + std::to_string(c.l2) + "," + c.source;
  }();
  return text.c_str();
}
