// tokenmill._core: the block manager and scheduler for Python. Step arrays
// are numpy views onto the C++ output, kept alive by the output object.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <optional>
#include <string>

#include "tokenmill/scheduler.h"

namespace py = pybind11;
using namespace tokenmill;

namespace {

template <typename T>
py::array_t<T> view(std::vector<T>& v, py::handle owner) {
  return py::array_t<T>({static_cast<py::ssize_t>(v.size())}, {sizeof(T)}, v.data(), owner);
}

py::array_t<int32_t> block_tables(SchedulerOutput& o, py::handle owner) {
  const py::ssize_t rows = o.num_seqs(), cols = o.max_blocks;
  return py::array_t<int32_t>(
      {rows, cols},
      {static_cast<py::ssize_t>(cols * sizeof(int32_t)), static_cast<py::ssize_t>(sizeof(int32_t))},
      o.block_tables.data(), owner);
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "tokenmill native core: paged KV block manager and scheduler";

  py::enum_<DraftMethod>(m, "DraftMethod")
      .value("NGRAM", DraftMethod::kNgram)
      .value("SUFFIX", DraftMethod::kSuffix)
      .value("MODEL", DraftMethod::kModel);

  py::class_<SpeculativeConfig>(m, "SpeculativeConfig")
      .def(py::init<>())
      .def_readwrite("num_tokens", &SpeculativeConfig::num_tokens)
      .def_readwrite("method", &SpeculativeConfig::method)
      .def_readwrite("max_step_tokens", &SpeculativeConfig::max_step_tokens)
      .def_readwrite("suffix_max_depth", &SpeculativeConfig::suffix_max_depth)
      .def_readwrite("suffix_max_requests", &SpeculativeConfig::suffix_max_requests)
      .def_readwrite("suffix_spec_factor", &SpeculativeConfig::suffix_spec_factor)
      .def_readwrite("suffix_min_token_prob", &SpeculativeConfig::suffix_min_token_prob)
      .def_readwrite("min_ngram", &SpeculativeConfig::min_ngram)
      .def_readwrite("max_ngram", &SpeculativeConfig::max_ngram);

  m.def(
      "propose_ngram",
      [](const std::vector<int32_t>& tokens, int min_n, int max_n, int k) {
        std::vector<int32_t> draft;
        propose_ngram(tokens, min_n, max_n, k, draft);
        return draft;
      },
      py::arg("tokens"), py::arg("min_n"), py::arg("max_n"), py::arg("k"),
      "Up to k tokens that followed the latest earlier occurrence of the longest "
      "tail (min_n..max_n tokens) of `tokens`.");

  py::class_<SchedulerConfig>(m, "SchedulerConfig")
      .def(py::init<>())
      .def_readwrite("num_blocks", &SchedulerConfig::num_blocks)
      .def_readwrite("block_size", &SchedulerConfig::block_size)
      .def_readwrite("max_num_seqs", &SchedulerConfig::max_num_seqs)
      .def_readwrite("max_num_batched_tokens", &SchedulerConfig::max_num_batched_tokens)
      .def_readwrite("max_model_len", &SchedulerConfig::max_model_len)
      .def_readwrite("enable_chunked_prefill", &SchedulerConfig::enable_chunked_prefill)
      .def_readwrite("enable_prefix_caching", &SchedulerConfig::enable_prefix_caching)
      .def_readwrite("priority_policy", &SchedulerConfig::priority_policy)
      .def_readwrite("max_step_ms", &SchedulerConfig::max_step_ms)
      .def_readwrite("aging_steps", &SchedulerConfig::aging_steps)
      .def_readwrite("speculative", &SchedulerConfig::speculative);

  py::class_<RequestParams>(m, "RequestParams")
      .def(py::init<>())
      .def_readwrite("max_tokens", &RequestParams::max_tokens)
      .def_readwrite("min_tokens", &RequestParams::min_tokens)
      .def_readwrite("n", &RequestParams::n)
      .def_readwrite("stop_token_ids", &RequestParams::stop_token_ids)
      .def_readwrite("eos_token_id", &RequestParams::eos_token_id)
      .def_readwrite("ignore_eos", &RequestParams::ignore_eos)
      .def_readwrite("priority", &RequestParams::priority)
      .def_readwrite("cache_salt", &RequestParams::cache_salt)
      .def_readwrite("restart_on_preempt", &RequestParams::restart_on_preempt)
      .def_readwrite("speculate", &RequestParams::speculate);

  py::class_<SchedulerOutput>(m, "SchedulerOutput")
      .def_property_readonly("num_seqs", &SchedulerOutput::num_seqs)
      .def_property_readonly("num_tokens", &SchedulerOutput::num_tokens)
      .def_property_readonly(
          "seq_ids", [](py::object s) { return view(s.cast<SchedulerOutput&>().seq_ids, s); })
      .def_property_readonly(
          "request_ids",
          [](py::object s) { return view(s.cast<SchedulerOutput&>().request_ids, s); })
      .def_property_readonly(
          "num_samples",
          [](py::object s) { return view(s.cast<SchedulerOutput&>().num_samples, s); })
      .def_property_readonly(
          "num_draft", [](py::object s) { return view(s.cast<SchedulerOutput&>().num_draft, s); })
      .def_readonly("decode_tokens", &SchedulerOutput::decode_tokens)
      .def_readonly("num_decode_seqs", &SchedulerOutput::num_decode_seqs)
      .def_readonly("prefill_context", &SchedulerOutput::prefill_context)
      .def_readonly("decode_context", &SchedulerOutput::decode_context)
      .def_property_readonly(
          "input_ids", [](py::object s) { return view(s.cast<SchedulerOutput&>().input_ids, s); })
      .def_property_readonly(
          "positions", [](py::object s) { return view(s.cast<SchedulerOutput&>().positions, s); })
      .def_property_readonly(
          "slot_mapping",
          [](py::object s) { return view(s.cast<SchedulerOutput&>().slot_mapping, s); })
      .def_property_readonly(
          "query_start_loc",
          [](py::object s) { return view(s.cast<SchedulerOutput&>().query_start_loc, s); })
      .def_property_readonly(
          "seq_lens", [](py::object s) { return view(s.cast<SchedulerOutput&>().seq_lens, s); })
      .def_property_readonly(
          "sample_rows",
          [](py::object s) { return view(s.cast<SchedulerOutput&>().sample_rows, s); })
      .def_property_readonly(
          "block_tables", [](py::object s) { return block_tables(s.cast<SchedulerOutput&>(), s); })
      .def_property_readonly("block_copies",
                             [](const SchedulerOutput& o) {
                               std::vector<std::pair<int, int>> v;
                               for (auto c : o.block_copies) v.emplace_back(c.src, c.dst);
                               return v;
                             })
      .def_readonly("preempted", &SchedulerOutput::preempted)
      .def_readonly("aborted", &SchedulerOutput::aborted)
      .def_readonly("admitted", &SchedulerOutput::admitted);

  py::enum_<EventKind>(m, "EventKind")
      .value("FORKED", EventKind::kForked)
      .value("APPENDED", EventKind::kAppended)
      .value("FINISHED", EventKind::kFinished);

  py::class_<SeqEvent>(m, "SeqEvent")
      .def_readonly("kind", &SeqEvent::kind)
      .def_readonly("request_id", &SeqEvent::request_id)
      .def_readonly("seq_id", &SeqEvent::seq_id)
      .def_readonly("parent", &SeqEvent::parent)
      .def_readonly("token", &SeqEvent::token)
      .def_readonly("sample", &SeqEvent::sample)
      .def_property_readonly("reason", [](const SeqEvent& e) { return to_string(e.reason); })
      .def("__repr__", [](const SeqEvent& e) {
        static const char* kinds[] = {"forked", "appended", "finished"};
        return std::string("<SeqEvent ") + kinds[static_cast<int>(e.kind)] + " seq " +
               std::to_string(e.seq_id) + " of request " + std::to_string(e.request_id) + ">";
      });

  py::class_<UpdateResult>(m, "UpdateResult")
      .def_readonly("events", &UpdateResult::events)
      .def_readonly("finished_requests", &UpdateResult::finished_requests)
      .def("of", &UpdateResult::of, py::arg("kind"), "The events of one kind, in order.");

  py::class_<SchedulerStats>(m, "SchedulerStats")
      .def_readonly("num_running_seqs", &SchedulerStats::num_running_seqs)
      .def_readonly("num_waiting_requests", &SchedulerStats::num_waiting_requests)
      .def_readonly("num_free_blocks", &SchedulerStats::num_free_blocks)
      .def_readonly("num_blocks", &SchedulerStats::num_blocks)
      .def_property_readonly("prefix_queries",
                             [](const SchedulerStats& s) { return s.prefix.queries; })
      .def_property_readonly("prefix_hits", [](const SchedulerStats& s) { return s.prefix.hits; })
      .def_readonly("draft_tokens", &SchedulerStats::draft_tokens)
      .def_readonly("accepted_tokens", &SchedulerStats::accepted_tokens);

  py::class_<Scheduler>(m, "Scheduler")
      .def(py::init<const SchedulerConfig&>())
      .def(
          "add_request",
          [](Scheduler& s, RequestId id, std::vector<int32_t> prompt, const RequestParams& p) {
            return s.add_request(id, std::move(prompt), p);
          },
          py::arg("request_id"), py::arg("prompt_token_ids"), py::arg("params"),
          "Queue a request; raises ValueError when it can never run. Returns its first sequence "
          "id.")
      .def("abort_request", &Scheduler::abort_request, "Finish a request and free its blocks.")
      .def(
          "finish_sequence",
          [](Scheduler& s, SeqId id, const std::string& reason) {
            s.finish_sequence(id, reason == "length"  ? FinishReason::kLength
                                  : reason == "abort" ? FinishReason::kAbort
                                                      : FinishReason::kStop);
          },
          py::arg("seq_id"), py::arg("reason") = "stop")
      .def("schedule", &Scheduler::schedule, "Build the next step's batch.")
      .def(
          "update",
          [](Scheduler& s, const SchedulerOutput& out,
             py::array_t<int32_t, py::array::c_style | py::array::forcecast> tokens,
             std::optional<py::array_t<int32_t, py::array::c_style | py::array::forcecast>>
                 counts) {
            if (!counts) return s.update(out, tokens.data(), tokens.size());
            if (counts->size() != out.num_seqs())
              throw std::invalid_argument("update: counts needs one entry per scheduled sequence");
            return s.update(out, tokens.data(), tokens.size(), counts->data());
          },
          py::arg("out"), py::arg("tokens"), py::arg("counts") = py::none(),
          "Continue each sampled sequence with counts[i] tokens (default: its num_samples): the "
          "first extends it, the others fork children, none drops it; a sequence with draft "
          "tokens appends its accepted drafts and one more token instead. Then apply the stop "
          "conditions. Returns the events in the order made.")
      .def("set_drafts", &Scheduler::set_drafts, py::arg("out"),
           "Draft-model speculation: take each sequence's draft tokens from the rows of "
           "out.input_ids reserved for them.")
      .def("set_draft_forward_ms", &Scheduler::set_draft_forward_ms, py::arg("ms"),
           "Draft-model speculation: the measured time of one draft forward, which the choice "
           "of draft lengths prices.")
      .def("has_unfinished", &Scheduler::has_unfinished)
      .def("has_request", &Scheduler::has_request, py::arg("request_id"))
      .def("stats", &Scheduler::stats)
      .def("check_invariants", &Scheduler::check_invariants)
      .def("observe_step",
           py::overload_cast<const SchedulerOutput&, double>(&Scheduler::observe_step),
           py::arg("out"), py::arg("ms"),
           "Feed a step's measured time to the cost model behind max_step_ms.")
      .def("observe_step", py::overload_cast<int, int, double>(&Scheduler::observe_step),
           py::arg("prefill_tokens"), py::arg("decode_rows"), py::arg("ms"),
           "Feed a measured step time to the cost model behind max_step_ms.")
      .def_property_readonly(
          "cost_model",
          [](const Scheduler& s) {
            const auto& c = s.cost_model().coefficients();
            return py::make_tuple(s.cost_model().fitted(), c[0], c[1], c[2], c[3]);
          },
          "(fitted, fixed ms, ms per prompt token, ms per decode row, ms per thousand tokens of "
          "attention context)")
      .def_property_readonly("last_token_budget", &Scheduler::last_token_budget)
      .def("block_table",
           [](const Scheduler& s, SeqId id) {
             const Sequence* q = s.sequence(id);
             return q ? q->block_table : std::vector<BlockId>{};
           })
      .def("seq_tokens",
           [](const Scheduler& s, SeqId id) {
             const Sequence* q = s.sequence(id);
             return q ? q->tokens : std::vector<int32_t>{};
           })
      .def("ref_count",
           [](const Scheduler& s, BlockId b) { return s.block_manager().ref_count(b); })
      .def_property_readonly("num_blocks", [](const Scheduler& s) { return s.config().num_blocks; })
      .def_property_readonly("block_size",
                             [](const Scheduler& s) { return s.config().block_size; });
}
