// Memory-mapped token shards seen as one stream of token ids.
//
// Each shard is a file holding n_tokens little-endian integers (uint8, uint16,
// int32, uint32 or int64) after a fixed byte offset. The Python side parses and
// validates the index files; this class maps the token files and copies ranges
// of the global stream into int64 rows.
//
// A file truncated under the mapping would make a read of the lost pages raise
// SIGBUS and kill the process. Two defences: every read first fstat()s the file
// and fails cleanly when it is shorter than at open, and the copy itself runs
// under a thread-local SIGBUS guard that turns a fault in the window between
// that check and the read into the same error (any other SIGBUS goes to the
// previous handler).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace ichiban::data {

enum class TokenType : int { kU8 = 1, kU16 = 2, kI32 = 3, kU32 = 4, kI64 = 5 };

struct ShardSpec {
  std::string path;
  int type;           // TokenType
  int64_t offset;     // byte offset of token 0 in the file
  int64_t n_tokens;
};

class TokenSource {
 public:
  TokenSource(const std::vector<ShardSpec>& shards, int64_t vocab_size);
  ~TokenSource();
  TokenSource(const TokenSource&) = delete;
  TokenSource& operator=(const TokenSource&) = delete;

  int64_t num_tokens() const { return total_; }
  int64_t vocab_size() const { return vocab_; }

  // Copies tokens [start, start + n) of the global stream into dst as int64,
  // checking each id against the vocabulary. Throws (naming the file) on a
  // truncated file or an id out of range. Thread-safe. check_size=false skips
  // the fstat check so that tests can reach the SIGBUS guard behind it.
  void read(int64_t start, int64_t n, int64_t* dst, bool check_size = true) const;

 private:
  struct Shard {
    ShardSpec spec;
    int fd = -1;
    const uint8_t* map = nullptr;
    size_t map_bytes = 0;
    int64_t first = 0;  // global index of its token 0
    int elem = 0;
  };
  void read_shard(const Shard& s, int64_t local, int64_t n, int64_t* dst, bool check_size) const;

  std::vector<Shard> shards_;
  int64_t total_ = 0;
  int64_t vocab_ = 0;
};

}  // namespace ichiban::data
