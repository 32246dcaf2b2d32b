// Run a merged model with onnxruntime's C++ API (written by `onnxmerge deploy`): a starting point for
// an application on the board. Build against the onnxruntime release the board has, for example:
//
//   g++ -std=c++17 run.cc -I$ORT/include -L$ORT/lib -lonnxruntime -Wl,-rpath,$ORT/lib -o run
//   ./run model.onnx                    # fixed inputs (0.01 * (i % 100)); prints each output's shape
//   ./run model.onnx IN OUT             # raw float32 inputs IN.<k>.f32 per input k; writes OUT.<k>.f32
//
// The model's ai.onnxmerge nodes (if any) run in libonnxmerge_kernels.so, registered from the
// program's working directory when the file is there; a model without them needs no library.
#include <onnxruntime_cxx_api.h>

#include <fstream>
#include <iostream>
#include <string>
#include <vector>

int main(int argc, char** argv) {
  try {
    const std::string model = argc > 1 ? argv[1] : "model.onnx";
    Ort::Env env(ORT_LOGGING_LEVEL_WARNING, "onnxmerge");
    Ort::SessionOptions options;
    options.SetIntraOpNumThreads(1);
    if (std::ifstream("libonnxmerge_kernels.so").good())
      options.RegisterCustomOpsLibrary(ORT_TSTR("./libonnxmerge_kernels.so"));
    Ort::Session session(env, model.c_str(), options);

    // the inputs: shapes from the model, dynamic dimensions taken as 1
    Ort::AllocatorWithDefaultOptions allocator;
    const auto memory = Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault);
    std::vector<Ort::AllocatedStringPtr> input_owned;
    std::vector<const char*> input_names;
    std::vector<std::vector<float>> input_data;
    input_data.reserve(session.GetInputCount());  // the tensors point into these buffers: they must not move
    std::vector<Ort::Value> inputs;
    for (size_t k = 0; k < session.GetInputCount(); ++k) {
      input_owned.push_back(session.GetInputNameAllocated(k, allocator));
      input_names.push_back(input_owned.back().get());
      auto shape = session.GetInputTypeInfo(k).GetTensorTypeAndShapeInfo().GetShape();
      size_t count = 1;
      for (auto& d : shape) count *= static_cast<size_t>(d = d > 0 ? d : 1);
      std::vector<float>& x = input_data.emplace_back(count);
      if (argc > 2) {
        const std::string path = std::string(argv[2]) + "." + std::to_string(k) + ".f32";
        std::ifstream in(path, std::ios::binary);
        if (!in.read(reinterpret_cast<char*>(x.data()), static_cast<std::streamsize>(count * sizeof(float)))) {
          std::cerr << path << ": expected " << count << " float32 values\n";
          return 1;
        }
      } else {
        for (size_t i = 0; i < count; ++i) x[i] = 0.01f * static_cast<float>(i % 100);
      }
      inputs.push_back(Ort::Value::CreateTensor<float>(memory, x.data(), count, shape.data(), shape.size()));
    }

    std::vector<Ort::AllocatedStringPtr> owned;
    std::vector<const char*> output_names;
    for (size_t k = 0; k < session.GetOutputCount(); ++k) {
      owned.push_back(session.GetOutputNameAllocated(k, allocator));
      output_names.push_back(owned.back().get());
    }
    auto outputs = session.Run(Ort::RunOptions{nullptr}, input_names.data(), inputs.data(), inputs.size(),
                               output_names.data(), output_names.size());

    for (size_t k = 0; k < outputs.size(); ++k) {
      const auto info = outputs[k].GetTensorTypeAndShapeInfo();
      std::cout << output_names[k] << ": shape [";
      for (size_t i = 0; i < info.GetShape().size(); ++i) std::cout << (i ? ", " : "") << info.GetShape()[i];
      std::cout << "]\n";
      if (argc > 3) {
        std::ofstream out(std::string(argv[3]) + "." + std::to_string(k) + ".f32", std::ios::binary);
        out.write(reinterpret_cast<const char*>(outputs[k].GetTensorData<float>()),
                  static_cast<std::streamsize>(info.GetElementCount() * sizeof(float)));
      }
    }
    return 0;
  } catch (const Ort::Exception& e) {
    std::cerr << "onnxruntime: " << e.what() << "\n";
    return 1;
  }
}
