// Python bindings of csrc/data/: memory-mapped token shards and the batch loader.
#include <torch/extension.h>

#include <memory>

#include "data/loader.h"
#include "data/token_source.h"

namespace py = pybind11;

namespace ichiban {

void bind_data(pybind11::module_& m) {
  using namespace ichiban::data;
  py::class_<TokenSource, std::shared_ptr<TokenSource>>(m, "TokenSource")
      .def(py::init([](const std::vector<std::tuple<std::string, int, int64_t, int64_t>>& shards,
                       int64_t vocab_size) {
             std::vector<ShardSpec> specs;
             for (const auto& [path, type, offset, n] : shards) specs.push_back({path, type, offset, n});
             return std::make_shared<TokenSource>(specs, vocab_size);
           }),
           py::arg("shards"), py::arg("vocab_size"),
           "shards: [(path, type code, byte offset, n_tokens)]; type codes 1 u8, 2 u16, 3 i32, 4 u32, 5 i64")
      .def_property_readonly("num_tokens", &TokenSource::num_tokens)
      .def_property_readonly("vocab_size", &TokenSource::vocab_size)
      .def(
          "read",
          [](const TokenSource& s, int64_t start, int64_t n, bool check_size) {
            at::Tensor out = at::empty({n}, at::kLong);
            int64_t* dst = out.data_ptr<int64_t>();
            {
              py::gil_scoped_release nogil;
              s.read(start, n, dst, check_size);
            }
            return out;
          },
          py::arg("start"), py::arg("n"), py::arg("check_size") = true,
          "tokens [start, start + n) of the stream as int64 (check_size=false: tests only, see token_source.h)");

  py::class_<BatchLoader>(m, "BatchLoader")
      .def(py::init([](std::shared_ptr<TokenSource> src, int64_t seq_len, int64_t batch_size,
                       int64_t rank, int64_t world_size, int64_t first_sample, int64_t num_samples,
                       uint64_t seed, bool shuffle, int64_t start_position, int64_t prefetch,
                       int64_t threads, bool pin_memory, bool documents, at::Tensor doc_starts) {
             LoaderOptions o;
             o.seq_len = seq_len;
             o.batch_size = batch_size;
             o.rank = rank;
             o.world_size = world_size;
             o.first_sample = first_sample;
             o.num_samples = num_samples;
             o.seed = seed;
             o.shuffle = shuffle;
             o.start_position = start_position;
             o.prefetch = prefetch;
             o.threads = threads;
             o.pin_memory = pin_memory;
             o.documents = documents;
             return std::make_unique<BatchLoader>(std::move(src), o, std::move(doc_starts));
           }),
           py::arg("source"), py::arg("seq_len"), py::arg("batch_size"), py::arg("rank"),
           py::arg("world_size"), py::arg("first_sample"), py::arg("num_samples"), py::arg("seed"),
           py::arg("shuffle"), py::arg("start_position"), py::arg("prefetch"), py::arg("threads"),
           py::arg("pin_memory"), py::arg("documents"), py::arg("doc_starts"))
      .def("next",
           [](BatchLoader& l) {
             std::vector<at::Tensor> out;
             {
               py::gil_scoped_release nogil;
               out = l.next();
             }
             py::tuple t(out.size());
             for (size_t i = 0; i < out.size(); ++i) t[i] = py::cast(std::move(out[i]));
             return t;
           },
           "the next batch as a tuple (waits without the GIL)")
      .def_property_readonly("batches_taken", &BatchLoader::batches_taken)
      .def_property_readonly("fresh_allocations", &BatchLoader::fresh_allocations)
      .def("sample_at", &BatchLoader::sample_at, py::arg("position"));

  m.def("sample_order", &sample_order, py::arg("n"), py::arg("seed"), py::arg("epoch"),
        py::arg("shuffle") = true, "the samples of one epoch in order: a keyed permutation of [0, n)");
}

}  // namespace ichiban
