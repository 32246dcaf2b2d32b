// The kernels' arithmetic without onnxruntime: a program that runs EConv / EFC layers read from files
// and writes their outputs, on a named instruction set. It exists so that the kernels of another
// architecture can be checked where no onnxruntime of that architecture runs: kernels/build.py
// builds it statically (`build_standalone`), qemu-user runs it, and the tests compare its outputs with
// the numpy oracle computed on the host (tests/kernels/test_kernels_cross.py).
//
//   onnxmerge_standalone isas              the built instruction sets this CPU runs, best first
//   onnxmerge_standalone ISA DIR...        run the layer in each DIR on ISA ("" = chosen per layer and input
//                                          size, as in onnxruntime), write DIR/y.f32; prints per layer
//                                          the instruction set it ran
//
// A layer directory holds `layer.txt`, one line of integers:
//   econv N d H W p kh kw V Vc C r sh sw pt pl pb pr dh dw code_bytes has_bias table_bits
//   efc   N d out V Vc C r code_bytes has_bias table_bits
// and raw little-endian arrays: x.f32, codebook.f32 [Vc, C, r], codes.u8 or codes.u16 (EConv
// [V, p, kh, kw], EFC [V, out]), bias.f32 when has_bias. Exit status 1 with a one-line reason on error.
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "lookup.h"

namespace {

template <typename T>
std::vector<T> read_array(const std::string& path, int64_t count) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error(path + ": cannot open");
  std::vector<T> data(static_cast<size_t>(count));
  in.read(reinterpret_cast<char*>(data.data()), static_cast<std::streamsize>(count * sizeof(T)));
  if (in.gcount() != static_cast<std::streamsize>(count * sizeof(T)))
    throw std::runtime_error(path + ": expected " + std::to_string(count) + " values");
  return data;
}

void write_array(const std::string& path, const std::vector<float>& data) {
  std::ofstream out(path, std::ios::binary);
  out.write(reinterpret_cast<const char*>(data.data()), static_cast<std::streamsize>(data.size() * sizeof(float)));
  if (!out) throw std::runtime_error(path + ": cannot write");
}

template <typename Code>
void run_econv(const std::string& dir, const std::string& isa, int64_t N, int64_t H, int64_t W, int64_t Vc,
               const onnxmerge::EConvParams& s, bool has_bias) {
  onnxmerge::EConvLayer layer;
  const auto codebook = read_array<float>(dir + "/codebook.f32", Vc * s.C * s.r);
  const auto codes = read_array<Code>(dir + (sizeof(Code) == 1 ? "/codes.u8" : "/codes.u16"), s.V * s.p * s.kh * s.kw);
  onnxmerge::pack_econv(layer, s, Vc, codebook.data(), codes.data(), isa);
  const auto x = read_array<float>(dir + "/x.f32", N * s.d * H * W);
  const auto bias = has_bias ? read_array<float>(dir + "/bias.f32", s.p) : std::vector<float>();
  const auto plan = layer.plan(H, W);
  std::cout << plan->isa->name << "\n";
  std::vector<float> y(static_cast<size_t>(N * s.p * plan->Ho * plan->Wo));
  onnxmerge::econv(layer, *plan, N, x.data(), has_bias ? bias.data() : nullptr, y.data());
  write_array(dir + "/y.f32", y);
}

template <typename Code>
void run_efc(const std::string& dir, const std::string& isa, int64_t N, int64_t Vc, const onnxmerge::EFCParams& s,
             bool has_bias) {
  onnxmerge::EFCLayer layer;
  const auto codebook = read_array<float>(dir + "/codebook.f32", Vc * s.C * s.r);
  const auto codes = read_array<Code>(dir + (sizeof(Code) == 1 ? "/codes.u8" : "/codes.u16"), s.V * s.out);
  onnxmerge::pack_efc(layer, s, Vc, codebook.data(), codes.data(), isa);
  std::cout << layer.isa->name << "\n";
  const auto x = read_array<float>(dir + "/x.f32", N * s.d);
  const auto bias = has_bias ? read_array<float>(dir + "/bias.f32", s.out) : std::vector<float>();
  std::vector<float> y(static_cast<size_t>(N * s.out));
  onnxmerge::efc(layer, N, x.data(), has_bias ? bias.data() : nullptr, y.data());
  write_array(dir + "/y.f32", y);
}

void run_layer(const std::string& dir, const std::string& isa) {
  std::ifstream in(dir + "/layer.txt");
  std::string line, op;
  if (!std::getline(in, line)) throw std::runtime_error(dir + "/layer.txt: cannot read");
  std::istringstream fields(line);
  fields >> op;
  if (op == "econv") {
    onnxmerge::EConvParams s;
    int64_t N, H, W, Vc, code_bytes, has_bias;
    fields >> N >> s.d >> H >> W >> s.p >> s.kh >> s.kw >> s.V >> Vc >> s.C >> s.r >> s.sh >> s.sw >> s.pt >> s.pl >>
        s.pb >> s.pr >> s.dh >> s.dw >> code_bytes >> has_bias >> s.table_bits;
    if (!fields) throw std::runtime_error(dir + "/layer.txt: expected 22 integers after 'econv'");
    if (code_bytes == 1)
      run_econv<uint8_t>(dir, isa, N, H, W, Vc, s, has_bias);
    else
      run_econv<uint16_t>(dir, isa, N, H, W, Vc, s, has_bias);
  } else if (op == "efc") {
    onnxmerge::EFCParams s;
    int64_t N, Vc, code_bytes, has_bias;
    fields >> N >> s.d >> s.out >> s.V >> Vc >> s.C >> s.r >> code_bytes >> has_bias >> s.table_bits;
    if (!fields) throw std::runtime_error(dir + "/layer.txt: expected 10 integers after 'efc'");
    if (code_bytes == 1)
      run_efc<uint8_t>(dir, isa, N, Vc, s, has_bias);
    else
      run_efc<uint16_t>(dir, isa, N, Vc, s, has_bias);
  } else {
    throw std::runtime_error(dir + "/layer.txt: unknown op '" + op + "' (econv or efc)");
  }
}

}  // namespace

int main(int argc, char** argv) {
  try {
    if (argc == 2 && std::string(argv[1]) == "isas") {
      std::string all;
      for (const auto& name : onnxmerge::built_isas())
        if (onnxmerge::cpu_supports(name)) all += (all.empty() ? "" : ",") + name;
      std::cout << all << "\n";
      return 0;
    }
    if (argc < 3) throw std::runtime_error("usage: onnxmerge_standalone isas | ISA DIR...");
    const std::string isa = argv[1];
    for (int k = 2; k < argc; ++k) run_layer(argv[k], isa);
    return 0;
  } catch (const std::exception& e) {
    std::cerr << "onnxmerge_standalone: " << e.what() << "\n";
    return 1;
  }
}
