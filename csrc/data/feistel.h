// A keyed permutation of [0, n) computed on the fly: a balanced Feistel network
// over the smallest even-bit power of two >= n, with cycle walking to stay in
// range. No table is built, so memory is O(1) in n; each lookup costs a few
// rounds of a 64-bit mixer, and cycle walking repeats them fewer than 4 times on
// average (the power of two is below 4n).
#pragma once

#include <cstdint>

namespace ichiban::data {

inline uint64_t mix64(uint64_t z) {  // splitmix64's finaliser: a bijective avalanche mixer
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

class Feistel {
 public:
  static constexpr int kRounds = 6;

  Feistel(uint64_t n, uint64_t seed, uint64_t epoch) : n_(n) {
    int bits = 0;
    while (bits < 64 && (uint64_t{1} << bits) < n) ++bits;
    half_ = (bits + 1) / 2;
    mask_ = half_ == 0 ? 0 : ((uint64_t{1} << half_) - 1);
    uint64_t s = mix64(seed ^ 0x6a09e667f3bcc909ULL);
    s = mix64(s ^ mix64(epoch + 0xbb67ae8584caa73bULL));
    for (int r = 0; r < kRounds; ++r) keys_[r] = mix64(s + 0x9e3779b97f4a7c15ULL * (r + 1));
  }

  uint64_t size() const { return n_; }

  // The image of i (0 <= i < n).
  uint64_t operator()(uint64_t i) const {
    if (n_ <= 1) return 0;
    uint64_t x = i;
    do {
      x = encrypt(x);
    } while (x >= n_);
    return x;
  }

 private:
  uint64_t encrypt(uint64_t x) const {
    uint64_t l = x >> half_, r = x & mask_;
    for (int k = 0; k < kRounds; ++k) {
      const uint64_t t = l ^ (mix64(r ^ keys_[k]) & mask_);
      l = r;
      r = t;
    }
    return (l << half_) | r;
  }

  uint64_t n_;
  int half_ = 0;
  uint64_t mask_ = 0;
  uint64_t keys_[kRounds];
};

}  // namespace ichiban::data
