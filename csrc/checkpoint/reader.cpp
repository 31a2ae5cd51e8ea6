#include "checkpoint/reader.h"

#include <fcntl.h>
#include <unistd.h>

#include <map>

#include "checkpoint/chunk_codec.h"
#include "checkpoint/crc32c.h"
#include "checkpoint/file_io.h"
#include "common/errors.h"
#include "common/thread_pool.h"

namespace ichiban {

namespace {

struct Fds {
  std::map<std::string, int> fd;
  ~Fds() {
    for (auto& kv : fd) ::close(kv.second);
  }
};

void read_one(const ReadSpec& s, int fd, uint8_t* dst, std::vector<uint8_t>& buf,
              ChunkCodecContext& ctx) {
  try {
    buf.resize(static_cast<size_t>(s.stored_length));
    pread_all(fd, buf.data(), buf.size(), s.file_offset, s.path);
    uint32_t got = crc32c(buf.data(), buf.size());
    if (got != s.crc) {
      char msg[96];
      std::snprintf(msg, sizeof(msg), "crc32c mismatch (manifest 0x%08x, file 0x%08x)", s.crc, got);
      ICHIBAN_CHECK(false, msg, ": the file is corrupted");
    }
    ctx.decode(buf.data(), buf.size(), s.codec, s.planes, dst + s.dst_offset,
               static_cast<size_t>(s.raw_length));
  } catch (const c10::Error& e) {
    ICHIBAN_CHECK(false, s.label, ": ", e.what_without_backtrace());
  }
}

}  // namespace

void read_chunks(const std::vector<ReadSpec>& specs, const std::vector<at::Tensor>& dsts) {
  for (const auto& dst : dsts)
    ICHIBAN_CHECK_ARG(dst.device().is_cpu() && dst.is_contiguous() && dst.scalar_type() == at::kByte,
                      "read_chunks: every destination must be a contiguous uint8 CPU tensor");
  Fds fds;
  for (const auto& s : specs) {
    ICHIBAN_CHECK_ARG(s.dst_index >= 0 && s.dst_index < static_cast<int64_t>(dsts.size()), s.label,
                      ": destination index ", s.dst_index, " out of range");
    const int64_t size = dsts[s.dst_index].numel();
    ICHIBAN_CHECK_ARG(s.dst_offset >= 0 && s.raw_length >= 0 && s.dst_offset + s.raw_length <= size,
                      s.label, ": destination range [", s.dst_offset, ", +", s.raw_length,
                      ") is outside the buffer of ", size, " bytes");
    if (fds.fd.count(s.path)) continue;
    int fd = ::open(s.path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
      int err = errno;
      ICHIBAN_CHECK(false, s.label, ": ", sys_error("open " + s.path, err));
    }
    fds.fd[s.path] = fd;
  }
  std::vector<uint8_t*> bases;
  for (const auto& dst : dsts) bases.push_back(dst.data_ptr<uint8_t>());
  default_pool().parallel_for(specs.size(), 1, [&](size_t b, size_t e) {
    std::vector<uint8_t> buf;
    ChunkCodecContext ctx;
    for (size_t i = b; i < e; ++i)
      read_one(specs[i], fds.fd.at(specs[i].path), bases[specs[i].dst_index], buf, ctx);
  });
}

}  // namespace ichiban
