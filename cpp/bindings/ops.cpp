// torch.ops.tokenmill.* on the CPU, through PyTorch's stable ABI. Schemas
// and fake implementations live in python/tokenmill/ops.py.
#include <memory>
#include <mutex>
#include <vector>

#include "op_impls.h"
#include "tokenmill/kernels.h"

namespace {

using torch::stable::Tensor;
namespace cpu = tokenmill::cpu;

// The CPU kernels, ignoring the tensor that names the device.
struct Cpu {
  static constexpr bool kHost = true;
  template <class... A>
  static void rows_to_float(const Tensor&, A... a) {
    cpu::rows_to_float(a...);
  }
  template <class... A>
  static void rows_from_float(const Tensor&, A... a) {
    cpu::rows_from_float(a...);
  }
  template <class... A>
  static void reshape_and_cache(const Tensor&, A... a) {
    cpu::reshape_and_cache(a...);
  }
  static void paged_attention(const Tensor&, const tokenmill::PagedAttentionParams& p) {
    cpu::paged_attention(p);
  }
  template <class... A>
  static void rms_norm(const Tensor&, A... a) {
    cpu::rms_norm(a...);
  }
  template <class... A>
  static void fused_add_rms_norm(const Tensor&, A... a) {
    cpu::fused_add_rms_norm(a...);
  }
  template <class... A>
  static void rotary_embedding(const Tensor&, A... a) {
    cpu::rotary_embedding(a...);
  }
  template <class... A>
  static void act_and_mul(const Tensor&, A... a) {
    cpu::act_and_mul(a...);
  }
  template <class... A>
  static void linear(const Tensor&, A... a) {
    cpu::linear(a...);
  }
  template <class... A>
  static void int4_linear(const Tensor&, A... a) {
    cpu::int4_linear(a...);
  }
  template <class... A>
  static void int4_dequantize(const Tensor&, A... a) {
    cpu::int4_dequantize(a...);
  }
  static void fused_moe(const Tensor&, const tokenmill::MoeParams& p) { cpu::fused_moe(p); }
};

// The ops a program runs, numbered as OP_NAMES in python/tokenmill/ops.py.
enum class ProgramOp : int64_t {
  kReshapeAndCache,
  kPagedAttention,
  kRmsNorm,
  kFusedAddRmsNorm,
  kRotaryEmbedding,
  kSiluAndMul,
  kGeluAndMul,
  kLinear,
  kInt4Linear,
  kInt4Dequantize,
  kCodedLinear,
  kGgufPackedLinear,
  kGgufPackedRows,
};

void coded_linear(Tensor out, Tensor x, Tensor low, Tensor codes, Tensor table,
                  Tensor escape_offsets, Tensor escape_cols, Tensor escape_values,
                  std::optional<Tensor> bias);
void gguf_packed_linear(Tensor out, Tensor x, Tensor packed, int64_t ggml_type,
                        int64_t activation_bits);
void gguf_packed_rows(Tensor out, Tensor ids, Tensor packed, int64_t ggml_type, int64_t n);

// A recorded sequence of the ops above in one call, so that a replayed decode
// step pays Python and the dispatcher once rather than once per op. `code`
// holds, per op, its number and then its arguments in schema order: tensors
// as indices into `tensors` (-1: None), ints and bools as themselves, floats
// as the next entry of `floats`.
void execute_program(const std::vector<Tensor>& tensors, const std::vector<int64_t>& code,
                     const std::vector<double>& floats) {
  namespace ops = tokenmill::ops;
  size_t pc = 0, fc = 0;
  auto tensor = [&]() -> Tensor { return tensors.at(code.at(pc++)); };
  auto maybe = [&]() -> std::optional<Tensor> {
    const int64_t i = code.at(pc++);
    return i < 0 ? std::nullopt : std::optional<Tensor>(tensors.at(i));
  };
  auto integer = [&]() { return code.at(pc++); };
  auto real = [&]() { return floats.at(fc++); };
  while (pc < code.size()) {
    switch (static_cast<ProgramOp>(code[pc++])) {
      case ProgramOp::kReshapeAndCache: {
        Tensor k = tensor(), v = tensor(), kc = tensor(), vc = tensor(), slots = tensor();
        ops::reshape_and_cache<Cpu>(k, v, kc, vc, slots);
        break;
      }
      case ProgramOp::kPagedAttention: {
        Tensor out = tensor(), q = tensor(), kc = tensor(), vc = tensor(), tables = tensor(),
               lens = tensor(), starts = tensor();
        const double scale = real();
        const int64_t window = integer();
        const double softcap = real();
        std::optional<Tensor> alibi = maybe();
        std::optional<Tensor> sinks = maybe();
        const int64_t decode_seqs = integer();
        ops::paged_attention<Cpu>(out, q, kc, vc, tables, lens, starts, scale, window, softcap,
                                  alibi, sinks, decode_seqs);
        break;
      }
      case ProgramOp::kRmsNorm: {
        Tensor out = tensor(), x = tensor(), w = tensor();
        ops::rms_norm<Cpu>(out, x, w, real());
        break;
      }
      case ProgramOp::kFusedAddRmsNorm: {
        Tensor x = tensor(), residual = tensor(), w = tensor();
        ops::fused_add_rms_norm<Cpu>(x, residual, w, real());
        break;
      }
      case ProgramOp::kRotaryEmbedding: {
        Tensor positions = tensor(), q = tensor();
        std::optional<Tensor> k = maybe();
        const int64_t head_size = integer();
        Tensor cache = tensor();
        ops::rotary_embedding<Cpu>(positions, q, k, head_size, cache, integer() != 0);
        break;
      }
      case ProgramOp::kSiluAndMul: {
        Tensor out = tensor(), x = tensor();
        ops::silu_and_mul<Cpu>(out, x);
        break;
      }
      case ProgramOp::kGeluAndMul: {
        Tensor out = tensor(), x = tensor();
        ops::gelu_and_mul<Cpu>(out, x, integer() != 0);
        break;
      }
      case ProgramOp::kLinear: {
        Tensor out = tensor(), x = tensor(), w = tensor();
        ops::linear<Cpu>(out, x, w, maybe());
        break;
      }
      case ProgramOp::kInt4Linear: {
        Tensor out = tensor(), x = tensor(), qw = tensor(), scales = tensor(), zeros = tensor();
        ops::int4_linear<Cpu>(out, x, qw, scales, zeros, integer());
        break;
      }
      case ProgramOp::kInt4Dequantize: {
        Tensor out = tensor(), qw = tensor(), scales = tensor(), zeros = tensor();
        const int64_t group_size = integer();
        ops::int4_dequantize<Cpu>(out, qw, scales, zeros, group_size, integer());
        break;
      }
      case ProgramOp::kCodedLinear: {
        Tensor out = tensor(), x = tensor(), low = tensor(), codes = tensor(), table = tensor(),
               offsets = tensor(), cols = tensor(), values = tensor();
        coded_linear(out, x, low, codes, table, offsets, cols, values, maybe());
        break;
      }
      case ProgramOp::kGgufPackedLinear: {
        Tensor out = tensor(), x = tensor(), packed = tensor();
        const int64_t type = integer();
        gguf_packed_linear(out, x, packed, type, integer());
        break;
      }
      case ProgramOp::kGgufPackedRows: {
        Tensor out = tensor(), ids = tensor(), packed = tensor();
        const int64_t type = integer();
        gguf_packed_rows(out, ids, packed, type, integer());
        break;
      }
      default:
        STD_TORCH_CHECK(false, "program: unknown op number");
    }
  }
  STD_TORCH_CHECK(fc == floats.size(), "program: unused float arguments");
}

// Programs stay here from their recording until their graph goes, so that a
// replay passes only the tensors each step makes anew (handing a program's
// hundreds of tensors across every step cost ~0.5 ms).
struct Program {
  std::vector<Tensor> tensors;
  std::vector<int64_t> code;
  std::vector<double> floats;
};
std::mutex programs_mutex;
std::vector<std::unique_ptr<Program>> programs;  // by id; null once unloaded

int64_t load_program(std::vector<Tensor> tensors, std::vector<int64_t> code,
                     std::vector<double> floats) {
  auto program =
      std::make_unique<Program>(Program{std::move(tensors), std::move(code), std::move(floats)});
  std::lock_guard<std::mutex> lock(programs_mutex);
  programs.push_back(std::move(program));
  return static_cast<int64_t>(programs.size()) - 1;
}

// Runs a loaded program with bound[i] in place of its tensor slots[i].
void run_loaded_program(int64_t id, std::vector<Tensor> bound, std::vector<int64_t> slots) {
  Program* program;
  {
    std::lock_guard<std::mutex> lock(programs_mutex);
    STD_TORCH_CHECK(id >= 0 && id < static_cast<int64_t>(programs.size()) && programs[id],
                    "run_loaded_program: no program ", id);
    program = programs[id].get();
  }
  STD_TORCH_CHECK(bound.size() == slots.size(), "run_loaded_program: one slot per bound tensor");
  for (size_t i = 0; i < slots.size(); ++i) program->tensors.at(slots[i]) = bound[i];
  execute_program(program->tensors, program->code, program->floats);
}

void unload_program(int64_t id) {
  std::lock_guard<std::mutex> lock(programs_mutex);
  if (id >= 0 && id < static_cast<int64_t>(programs.size())) programs[id].reset();
}

// The greedy token of one hidden state x [1, k] over an LM head weight
// [v, k], through its int8 copy q [v, k] with row scales and error bounds
// (python/tokenmill/layers/greedy_head.py); token[0] = -1 where the caller
// must take the full logits instead.
void greedy_head(Tensor token, Tensor x, Tensor weight, Tensor q, Tensor scales, Tensor bounds) {
  using torch::headeronly::ScalarType;
  STD_TORCH_CHECK(token.scalar_type() == ScalarType::Long && token.numel() == 1,
                  "greedy_head: token must be one int64");
  STD_TORCH_CHECK(x.dim() == 2 && x.size(0) == 1 && x.is_contiguous(),
                  "greedy_head: x must be one contiguous row");
  const int64_t v = weight.size(0), k = x.size(1);
  STD_TORCH_CHECK(weight.dim() == 2 && weight.size(1) == k && weight.is_contiguous(),
                  "greedy_head: weight must be contiguous [v, k]");
  STD_TORCH_CHECK(q.scalar_type() == ScalarType::Char && q.is_contiguous() && q.dim() == 2 &&
                      q.size(0) == v && q.size(1) == k,
                  "greedy_head: q must be contiguous int8 [v, k]");
  for (const Tensor* t : {&scales, &bounds})
    STD_TORCH_CHECK(t->scalar_type() == ScalarType::Float && t->is_contiguous() && t->numel() == v,
                    "greedy_head: scales and bounds must be float32 [v]");
  *static_cast<int64_t*>(token.data_ptr()) =
      cpu::greedy_head(tokenmill::ops::dtype_of(x), tokenmill::ops::dtype_of(weight), x.data_ptr(),
                       weight.data_ptr(), static_cast<const int8_t*>(q.data_ptr()),
                       static_cast<const float*>(scales.data_ptr()),
                       static_cast<const float*>(bounds.data_ptr()), k, v);
}

// Codes a bfloat16 weight [n, k] by `table`: low, codes and escape_offsets,
// or with escape_cols and escape_values, the escapes (kernels.h: code_bf16).
void code_bf16(Tensor weight, Tensor table, Tensor low, Tensor codes, Tensor escape_offsets,
               std::optional<Tensor> escape_cols, std::optional<Tensor> escape_values) {
  using torch::headeronly::ScalarType;
  const int64_t n = weight.size(0), k = weight.size(1);
  STD_TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == ScalarType::BFloat16 &&
                      weight.is_contiguous() && k % 64 == 0,
                  "code_bf16: weight must be contiguous bfloat16 [n, k] with k a multiple of 64");
  STD_TORCH_CHECK(table.scalar_type() == ScalarType::Byte && table.numel() == 16 &&
                      low.scalar_type() == ScalarType::Byte && low.is_contiguous() &&
                      low.numel() == n * k && codes.scalar_type() == ScalarType::Byte &&
                      codes.is_contiguous() && codes.numel() == n * k / 2 &&
                      escape_offsets.scalar_type() == ScalarType::Int &&
                      escape_offsets.is_contiguous() && escape_offsets.numel() == n + 1,
                  "code_bf16: table uint8 [16], low uint8 [n, k], codes uint8 [n, k / 2] and "
                  "escape_offsets int32 [n + 1], contiguous");
  STD_TORCH_CHECK(escape_cols.has_value() == escape_values.has_value(),
                  "code_bf16: escape_cols and escape_values come together");
  int32_t* cols = nullptr;
  float* values = nullptr;
  if (escape_cols) {
    const int64_t count = static_cast<const int32_t*>(escape_offsets.data_ptr())[n];
    STD_TORCH_CHECK(escape_cols->scalar_type() == ScalarType::Int &&
                        escape_values->scalar_type() == ScalarType::Float &&
                        escape_cols->numel() == count && escape_values->numel() == count,
                    "code_bf16: escape_cols int32 and escape_values float32, one per escape");
    cols = static_cast<int32_t*>(escape_cols->data_ptr());
    values = static_cast<float*>(escape_values->data_ptr());
  }
  cpu::code_bf16(static_cast<const uint16_t*>(weight.data_ptr()), n, k,
                 static_cast<const uint8_t*>(table.data_ptr()),
                 static_cast<uint8_t*>(low.data_ptr()), static_cast<uint8_t*>(codes.data_ptr()),
                 static_cast<int32_t*>(escape_offsets.data_ptr()), cols, values);
}

// A coded bfloat16 weight [n, k] (layout in tokenmill/kernels.h; made by
// python/tokenmill/layers/coded.py), checked.
cpu::CodedBf16 coded_weight(const Tensor& low, const Tensor& codes, const Tensor& table,
                            const Tensor& escape_offsets, const Tensor& escape_cols,
                            const Tensor& escape_values) {
  using torch::headeronly::ScalarType;
  const int64_t n = low.size(0), k = low.size(1);
  STD_TORCH_CHECK(
      low.dim() == 2 && low.scalar_type() == ScalarType::Byte && low.is_contiguous() && k % 64 == 0,
      "coded_linear: low must be contiguous uint8 [n, k] with k a multiple of 64");
  STD_TORCH_CHECK(codes.scalar_type() == ScalarType::Byte && codes.is_contiguous() &&
                      codes.numel() == n * k / 2,
                  "coded_linear: codes must be contiguous uint8 [n, k / 2]");
  STD_TORCH_CHECK(table.scalar_type() == ScalarType::Byte && table.numel() == 16,
                  "coded_linear: table must be 16 uint8");
  STD_TORCH_CHECK(escape_offsets.scalar_type() == ScalarType::Int &&
                      escape_offsets.is_contiguous() && escape_offsets.numel() == n + 1 &&
                      escape_cols.scalar_type() == ScalarType::Int &&
                      escape_values.scalar_type() == ScalarType::Float &&
                      escape_cols.numel() == escape_values.numel(),
                  "coded_linear: escapes must be int32 offsets [n + 1], int32 columns and "
                  "float32 values");
  return {static_cast<const uint8_t*>(low.data_ptr()),
          static_cast<const uint8_t*>(codes.data_ptr()),
          static_cast<const uint8_t*>(table.data_ptr()),
          static_cast<const int32_t*>(escape_offsets.data_ptr()),
          static_cast<const int32_t*>(escape_cols.data_ptr()),
          static_cast<const float*>(escape_values.data_ptr()),
          n,
          k};
}

// out [m, n] = x [m, k] . w^T (+ bias) over a coded bfloat16 weight w.
void coded_linear(Tensor out, Tensor x, Tensor low, Tensor codes, Tensor table,
                  Tensor escape_offsets, Tensor escape_cols, Tensor escape_values,
                  std::optional<Tensor> bias) {
  using tokenmill::ops::dtype_of;
  const cpu::CodedBf16 w =
      coded_weight(low, codes, table, escape_offsets, escape_cols, escape_values);
  const int64_t n = w.n, k = w.k;
  STD_TORCH_CHECK(x.dim() == 2 && x.size(1) == k && x.stride(1) == 1,
                  "coded_linear: x must be [m, k] with unit stride");
  STD_TORCH_CHECK(out.dim() == 2 && out.size(0) == x.size(0) && out.size(1) == n &&
                      out.stride(1) == 1 && out.scalar_type() == x.scalar_type(),
                  "coded_linear: out must be [m, n] of x's dtype with unit stride");
  if (bias)
    STD_TORCH_CHECK(
        bias->numel() == n && bias->is_contiguous() && bias->scalar_type() == x.scalar_type(),
        "coded_linear: bias must be contiguous [n] of x's dtype");
  cpu::coded_linear(dtype_of(x), out.data_ptr(), x.data_ptr(), w, bias ? bias->data_ptr() : nullptr,
                    x.size(0), x.stride(0), out.stride(0));
}

// fused_moe over coded copies of w13 viewed as [experts * 2 * inter, hidden]
// and w2 as [experts * hidden, inter] (w13 and w2 themselves give the shapes).
void fused_moe_coded(Tensor out, Tensor x, Tensor w13, Tensor w2, Tensor topk_weights,
                     Tensor topk_ids, int64_t activation, std::optional<Tensor> w13_bias,
                     std::optional<Tensor> w2_bias, double swiglu_alpha, double swiglu_limit,
                     Tensor w13_low, Tensor w13_codes, Tensor w13_table, Tensor w13_escape_offsets,
                     Tensor w13_escape_cols, Tensor w13_escape_values, Tensor w2_low,
                     Tensor w2_codes, Tensor w2_table, Tensor w2_escape_offsets,
                     Tensor w2_escape_cols, Tensor w2_escape_values) {
  const tokenmill::MoeParams p =
      tokenmill::ops::moe_params(out, x, w13, w2, topk_weights, topk_ids, activation, w13_bias,
                                 w2_bias, swiglu_alpha, swiglu_limit);
  const cpu::CodedBf16 c13 = coded_weight(w13_low, w13_codes, w13_table, w13_escape_offsets,
                                          w13_escape_cols, w13_escape_values);
  const cpu::CodedBf16 c2 =
      coded_weight(w2_low, w2_codes, w2_table, w2_escape_offsets, w2_escape_cols, w2_escape_values);
  STD_TORCH_CHECK(c13.n == p.num_experts * 2 * p.inter && c13.k == p.hidden &&
                      c2.n == p.num_experts * p.hidden && c2.k == p.inter,
                  "fused_moe_coded: coded weights do not match w13 and w2");
  if (p.num_tokens > 0) cpu::fused_moe(p, &c13, &c2);
}

cpu::GgufWeight gguf_weight(const Tensor& qweight, int64_t ggml_type, int64_t k) {
  STD_TORCH_CHECK(cpu::gguf_type_supported(ggml_type), "GGUF block type ", ggml_type,
                  " is not supported");
  const auto type = static_cast<tokenmill::GgufType>(ggml_type);
  STD_TORCH_CHECK(qweight.scalar_type() == torch::headeronly::ScalarType::Byte &&
                      qweight.dim() == 2 && qweight.is_contiguous() && k % 32 == 0 &&
                      qweight.size(1) == k / 32 * tokenmill::gguf_block_bytes(type),
                  "qweight must be contiguous uint8 [n, k / 32 * block bytes]");
  return {type, static_cast<const uint8_t*>(qweight.data_ptr()), qweight.size(1), qweight.size(0),
          k};
}

// out float32 [rows, k] = rows row_start.. of a GGUF block weight, dequantized.
void gguf_dequantize(Tensor out, Tensor qweight, int64_t ggml_type, int64_t row_start) {
  STD_TORCH_CHECK(out.scalar_type() == torch::headeronly::ScalarType::Float &&
                      out.is_contiguous() && out.dim() == 2,
                  "gguf_dequantize: out must be contiguous float32 [rows, k]");
  const cpu::GgufWeight w = gguf_weight(qweight, ggml_type, out.size(1));
  STD_TORCH_CHECK(row_start >= 0 && row_start + out.size(0) <= w.n,
                  "gguf_dequantize: rows outside the weight");
  cpu::gguf_dequantize(w, static_cast<float*>(out.data_ptr()), row_start, row_start + out.size(0));
}

// out [m, n] = x [m, k] . dequant(qweight)^T for up to 16 rows; x and out of one float dtype.
void gguf_linear(Tensor out, Tensor x, Tensor qweight, int64_t ggml_type) {
  using tokenmill::ops::dtype_of;
  STD_TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && x.size(0) <= 16,
                  "gguf_linear: x must be [m <= 16, k] with unit stride");
  const cpu::GgufWeight w = gguf_weight(qweight, ggml_type, x.size(1));
  STD_TORCH_CHECK(out.dim() == 2 && out.size(0) == x.size(0) && out.size(1) == w.n &&
                      out.stride(1) == 1 && out.scalar_type() == x.scalar_type(),
                  "gguf_linear: out must be [m, n] of x's dtype with unit stride");
  const int64_t m = x.size(0);
  std::vector<float> xf(static_cast<size_t>(m * w.k)), of(static_cast<size_t>(m * w.n));
  cpu::rows_to_float(dtype_of(x), xf.data(), x.data_ptr(), m, w.k, x.stride(0), w.k);
  cpu::gguf_linear(w, xf.data(), m, of.data());
  cpu::rows_from_float(dtype_of(out), out.data_ptr(), of.data(), m, w.n, out.stride(0), w.n);
}

cpu::GgufWeight gguf_packed_weight(const Tensor& packed, int64_t ggml_type, int64_t n, int64_t k) {
  STD_TORCH_CHECK(cpu::gguf_packed_supported(ggml_type), "GGUF block type ", ggml_type,
                  " has no packed form");
  const auto type = static_cast<tokenmill::GgufType>(ggml_type);
  STD_TORCH_CHECK(packed.scalar_type() == torch::headeronly::ScalarType::Byte &&
                      packed.dim() == 2 && packed.is_contiguous() && k % 32 == 0 &&
                      packed.size(0) == (n + 7) / 8 &&
                      packed.size(1) == cpu::gguf_packed_group_bytes(type, k),
                  "packed GGUF weight must be contiguous uint8 [ceil(n / 8), group bytes]");
  return {type, static_cast<const uint8_t*>(packed.data_ptr()), packed.size(1), n, k};
}

// packed = qweight [n, k / 32 * block bytes] in groups of eight rows.
void gguf_pack(Tensor packed, Tensor qweight, int64_t ggml_type, int64_t k) {
  const cpu::GgufWeight w = gguf_weight(qweight, ggml_type, k);
  gguf_packed_weight(packed, ggml_type, w.n, k);
  cpu::gguf_pack(w, static_cast<uint8_t*>(packed.data_ptr()));
}

// out [m, n] = x [m, k] . dequant(packed)^T for any m; x and out of one float dtype.
void gguf_packed_linear(Tensor out, Tensor x, Tensor packed, int64_t ggml_type,
                        int64_t activation_bits) {
  using tokenmill::ops::dtype_of;
  STD_TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1,
                  "gguf_packed_linear: x must be [m, k] with unit stride");
  STD_TORCH_CHECK(out.dim() == 2 && out.size(0) == x.size(0) && out.stride(1) == 1 &&
                      (out.scalar_type() == x.scalar_type() ||
                       out.scalar_type() == torch::headeronly::ScalarType::Float),
                  "gguf_packed_linear: out must be [m, n] of x's dtype or float32 with unit "
                  "stride");
  const cpu::GgufWeight w = gguf_packed_weight(packed, ggml_type, out.size(1), x.size(1));
  STD_TORCH_CHECK(activation_bits == 8 || activation_bits == 14,
                  "gguf_packed_linear: activation_bits must be 8 or 14");
  cpu::gguf_packed_linear(w, dtype_of(x), x.data_ptr(), x.stride(0), x.size(0), dtype_of(out),
                          out.data_ptr(), out.stride(0), static_cast<int>(activation_bits));
}

// out [c, k] = rows ids of the dequantized packed weight (of n rows).
void gguf_packed_rows(Tensor out, Tensor ids, Tensor packed, int64_t ggml_type, int64_t n) {
  using tokenmill::ops::dtype_of;
  STD_TORCH_CHECK(ids.scalar_type() == torch::headeronly::ScalarType::Long && ids.dim() == 1 &&
                      ids.is_contiguous(),
                  "gguf_packed_rows: ids must be a contiguous int64 vector");
  STD_TORCH_CHECK(out.dim() == 2 && out.size(0) == ids.size(0) && out.is_contiguous(),
                  "gguf_packed_rows: out must be contiguous [len(ids), k]");
  const cpu::GgufWeight w = gguf_packed_weight(packed, ggml_type, n, out.size(1));
  const int64_t* p = static_cast<const int64_t*>(ids.data_ptr());
  for (int64_t c = 0; c < ids.size(0); ++c)
    STD_TORCH_CHECK(p[c] >= 0 && p[c] < n, "gguf_packed_rows: row ", p[c], " outside [0, ", n, ")");
  const bool f32 = out.scalar_type() == torch::headeronly::ScalarType::Float;
  std::vector<float> of(f32 ? 0 : static_cast<size_t>(out.numel()));
  float* op = f32 ? static_cast<float*>(out.data_ptr()) : of.data();
  cpu::gguf_packed_rows(w, p, ids.size(0), op);
  if (!f32) cpu::rows_from_float(dtype_of(out), out.data_ptr(), op, ids.size(0), w.k, w.k, w.k);
}

// out[r] (int64) = the first index of the maximum of row r of x [m, n].
// logits float32 [n, vocab] (unit column stride); bitmask int32 [n, ceil(vocab / 32)];
// rows int64: the rows to mask.
void apply_token_bitmask(Tensor logits, Tensor bitmask, Tensor rows) {
  const auto i64 = torch::headeronly::ScalarType::Long;
  STD_TORCH_CHECK(logits.dim() == 2 && logits.stride(1) == 1 &&
                      logits.scalar_type() == torch::headeronly::ScalarType::Float,
                  "apply_token_bitmask: logits must be float32 [n, vocab] with unit stride");
  const int64_t n = logits.size(0), vocab = logits.size(1), words = (vocab + 31) / 32;
  STD_TORCH_CHECK(bitmask.dim() == 2 && bitmask.is_contiguous() && bitmask.size(0) == n &&
                      bitmask.size(1) >= words &&
                      bitmask.scalar_type() == torch::headeronly::ScalarType::Int,
                  "apply_token_bitmask: bitmask must be contiguous int32 [n, >= ceil(vocab / 32)]");
  STD_TORCH_CHECK(rows.dim() == 1 && rows.is_contiguous() && rows.scalar_type() == i64,
                  "apply_token_bitmask: rows must be contiguous int64");
  const auto* r = static_cast<const int64_t*>(rows.data_ptr());
  for (int64_t i = 0; i < rows.size(0); ++i)
    STD_TORCH_CHECK(r[i] >= 0 && r[i] < n, "apply_token_bitmask: row ", r[i],
                    " outside the logits");
  cpu::apply_token_bitmask(static_cast<float*>(logits.data_ptr()), logits.stride(0),
                           static_cast<const int32_t*>(bitmask.data_ptr()), bitmask.size(1), r,
                           rows.size(0), vocab);
}

void argmax_rows(Tensor out, Tensor x) {
  STD_TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1,
                  "argmax_rows: x must be [m, n] with unit stride");
  STD_TORCH_CHECK(out.scalar_type() == torch::headeronly::ScalarType::Long && out.is_contiguous() &&
                      out.numel() == x.size(0),
                  "argmax_rows: out must be int64 [m]");
  STD_TORCH_CHECK(x.size(1) > 0, "argmax_rows: rows must not be empty");
  cpu::argmax_rows(tokenmill::ops::dtype_of(x), static_cast<int64_t*>(out.data_ptr()), x.data_ptr(),
                   x.size(0), x.size(1), x.stride(0));
}

}  // namespace

STABLE_TORCH_LIBRARY(tokenmill, m) { tokenmill::ops::define_ops(m); }

STABLE_TORCH_LIBRARY_IMPL(tokenmill, CPU, m) {
  m.impl("reshape_and_cache", TORCH_BOX(&tokenmill::ops::reshape_and_cache<Cpu>));
  m.impl("paged_attention", TORCH_BOX(&tokenmill::ops::paged_attention<Cpu>));
  m.impl("rms_norm", TORCH_BOX(&tokenmill::ops::rms_norm<Cpu>));
  m.impl("fused_add_rms_norm", TORCH_BOX(&tokenmill::ops::fused_add_rms_norm<Cpu>));
  m.impl("rotary_embedding", TORCH_BOX(&tokenmill::ops::rotary_embedding<Cpu>));
  m.impl("silu_and_mul", TORCH_BOX(&tokenmill::ops::silu_and_mul<Cpu>));
  m.impl("gelu_and_mul", TORCH_BOX(&tokenmill::ops::gelu_and_mul<Cpu>));
  m.impl("linear", TORCH_BOX(&tokenmill::ops::linear<Cpu>));
  m.impl("int4_linear", TORCH_BOX(&tokenmill::ops::int4_linear<Cpu>));
  m.impl("int4_dequantize", TORCH_BOX(&tokenmill::ops::int4_dequantize<Cpu>));
  m.impl("fused_moe", TORCH_BOX(&tokenmill::ops::fused_moe<Cpu>));
  m.impl("fused_moe_coded", TORCH_BOX(&fused_moe_coded));
  m.impl("gguf_linear", TORCH_BOX(&gguf_linear));
  m.impl("gguf_dequantize", TORCH_BOX(&gguf_dequantize));
  m.impl("gguf_pack", TORCH_BOX(&gguf_pack));
  m.impl("gguf_packed_linear", TORCH_BOX(&gguf_packed_linear));
  m.impl("gguf_packed_rows", TORCH_BOX(&gguf_packed_rows));
  m.impl("coded_linear", TORCH_BOX(&coded_linear));
  m.impl("code_bf16", TORCH_BOX(&code_bf16));
  m.impl("load_program", TORCH_BOX(&load_program));
  m.impl("greedy_head", TORCH_BOX(&greedy_head));
  m.impl("argmax_rows", TORCH_BOX(&argmax_rows));
  m.impl("apply_token_bitmask", TORCH_BOX(&apply_token_bitmask));
}

// They may take no tensor to dispatch on (a program whose every tensor is fixed).
STABLE_TORCH_LIBRARY_IMPL(tokenmill, CompositeExplicitAutograd, m) {
  m.impl("run_loaded_program", TORCH_BOX(&run_loaded_program));
  m.impl("unload_program", TORCH_BOX(&unload_program));
}
