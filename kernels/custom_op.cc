// onnxruntime registration of the ai.onnxmerge ops (EConv, EFC), version 1: a thin layer over the
// arithmetic in lookup.cc. Built against onnxruntime's C/C++ headers only; onnxruntime hands the API
// pointer to RegisterCustomOps, so the library does not link libonnxruntime.
#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT

#include <exception>
#include <mutex>
#include <string>
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

std::vector<int64_t> ints(const Ort::ConstKernelInfo& info, const char* name, std::vector<int64_t> fallback) {
  try {
    return info.GetAttributes<int64_t>(name);
  } catch (const Ort::Exception&) {
    return fallback;  // attribute absent
  }
}

void expect(bool ok, const std::string& what) {
  if (!ok) throw std::invalid_argument(what);
}

// The inputs shared by both ops: X, codebook, codes (uint8 or uint16), optional B.
struct Inputs {
  Ort::ConstValue x, codebook, codes, bias{nullptr};
  std::vector<int64_t> xs, cbs, cs;
  ONNXTensorElementDataType code_type;
};

Inputs read_inputs(Ort::KernelContext& ctx, const char* op) {
  Inputs in{ctx.GetInput(0), ctx.GetInput(1), ctx.GetInput(2), Ort::ConstValue{nullptr}, {}, {}, {},
            ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED};
  if (ctx.GetInputCount() > 3) in.bias = ctx.GetInput(3);
  in.xs = in.x.GetTensorTypeAndShapeInfo().GetShape();
  in.cbs = in.codebook.GetTensorTypeAndShapeInfo().GetShape();
  auto code_info = in.codes.GetTensorTypeAndShapeInfo();
  in.cs = code_info.GetShape();
  in.code_type = code_info.GetElementType();
  const std::string name(op);
  expect(in.code_type == ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8 || in.code_type == ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT16,
         name + ": codes must be uint8 or uint16");
  expect(in.cbs.size() == 3, name + ": codebook must be 3-D [V', C, r]");
  return in;
}

int64_t check_bias(const Inputs& in, int64_t channels, const char* op) {
  if (!in.bias) return 0;
  auto shape = in.bias.GetTensorTypeAndShapeInfo().GetShape();
  expect(shape.size() == 1 && shape[0] == channels,
         std::string(op) + ": bias must be 1-D with one value per output channel");
  return 1;
}

// ---------------------------------------------------------------------------------------------
// EConv

struct EConvKernel {
  int64_t in_channels;
  std::vector<int64_t> kernel_shape, strides, pads, dilations;

  explicit EConvKernel(const OrtKernelInfo* info_ptr) {
    Ort::ConstKernelInfo info(info_ptr);
    in_channels = info.GetAttribute<int64_t>("in_channels");
    kernel_shape = ints(info, "kernel_shape", {});
    strides = ints(info, "strides", {1, 1});
    pads = ints(info, "pads", {0, 0, 0, 0});
    dilations = ints(info, "dilations", {1, 1});
    expect(strides.size() == 2, "EConv: strides must have 2 values");
    expect(pads.size() == 4, "EConv: pads must have 4 values");
    expect(dilations.size() == 2, "EConv: dilations must have 2 values");
    expect(kernel_shape.empty() || kernel_shape.size() == 2, "EConv: kernel_shape must have 2 values");
  }

  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    return guarded([&] {
      Ort::KernelContext ctx(context);
      Inputs in = read_inputs(ctx, "EConv");
      expect(in.xs.size() == 4, "EConv: input must be 4-D [N, d, H, W]");
      expect(in.cs.size() == 4, "EConv: codes must be 4-D [V, p, kh, kw]");
      onnxmerge::EConvShape s;
      s.N = in.xs[0], s.d = in.xs[1], s.H = in.xs[2], s.W = in.xs[3];
      s.cb = {in.cbs[0], in.cbs[1], in.cbs[2]};
      s.V = in.cs[0], s.p = in.cs[1], s.kh = in.cs[2], s.kw = in.cs[3];
      s.sh = strides[0], s.sw = strides[1];
      s.pt = pads[0], s.pl = pads[1], s.pb = pads[2], s.pr = pads[3];
      s.dh = dilations[0], s.dw = dilations[1];
      expect(s.d == in_channels, "EConv: input has " + std::to_string(s.d) + " channels, in_channels is " +
                                     std::to_string(in_channels));
      expect(kernel_shape.empty() || (kernel_shape[0] == s.kh && kernel_shape[1] == s.kw),
             "EConv: kernel_shape does not match the codes' shape");
      onnxmerge::check(s);
      const bool has_bias = check_bias(in, s.p, "EConv");
      auto y = ctx.GetOutput(0, {s.N, s.p, s.Ho(), s.Wo()});
      const float* bias = has_bias ? in.bias.GetTensorData<float>() : nullptr;
      if (in.code_type == ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8)
        onnxmerge::econv(s, in.x.GetTensorData<float>(), in.codebook.GetTensorData<float>(),
                         in.codes.GetTensorData<uint8_t>(), bias, y.GetTensorMutableData<float>());
      else
        onnxmerge::econv(s, in.x.GetTensorData<float>(), in.codebook.GetTensorData<float>(),
                         in.codes.GetTensorData<uint16_t>(), bias, y.GetTensorMutableData<float>());
    });
  }
};

// ---------------------------------------------------------------------------------------------
// EFC

struct EFCKernel {
  int64_t in_features;

  explicit EFCKernel(const OrtKernelInfo* info_ptr) {
    Ort::ConstKernelInfo info(info_ptr);
    in_features = info.GetAttribute<int64_t>("in_features");
  }

  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    return guarded([&] {
      Ort::KernelContext ctx(context);
      Inputs in = read_inputs(ctx, "EFC");
      expect(in.xs.size() == 2, "EFC: input must be 2-D [N, d]");
      expect(in.cs.size() == 2, "EFC: codes must be 2-D [V, out]");
      onnxmerge::EFCShape s;
      s.N = in.xs[0], s.d = in.xs[1];
      s.cb = {in.cbs[0], in.cbs[1], in.cbs[2]};
      s.V = in.cs[0], s.out = in.cs[1];
      expect(s.d == in_features, "EFC: input has " + std::to_string(s.d) + " features, in_features is " +
                                     std::to_string(in_features));
      onnxmerge::check(s);
      const bool has_bias = check_bias(in, s.out, "EFC");
      auto y = ctx.GetOutput(0, {s.N, s.out});
      const float* bias = has_bias ? in.bias.GetTensorData<float>() : nullptr;
      if (in.code_type == ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8)
        onnxmerge::efc(s, in.x.GetTensorData<float>(), in.codebook.GetTensorData<float>(),
                       in.codes.GetTensorData<uint8_t>(), bias, y.GetTensorMutableData<float>());
      else
        onnxmerge::efc(s, in.x.GetTensorData<float>(), in.codebook.GetTensorData<float>(),
                       in.codes.GetTensorData<uint16_t>(), bias, y.GetTensorMutableData<float>());
    });
  }
};

// ---------------------------------------------------------------------------------------------
// the op descriptions: inputs X (float), codebook (float), codes (uint8 | uint16: any type here,
// checked at run time), B (float, optional); output Y (float)

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
