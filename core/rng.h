// A small deterministic random generator (xoshiro256**, seeded through splitmix64).
//
// Used for PyTorch-style parameter initialisation and dropout masks. Its whole state is four
// words, so a checkpoint can save it and a restored model draws the same masks.
#ifndef NORMD_CORE_RNG_H_
#define NORMD_CORE_RNG_H_

#include <array>
#include <cstdint>

namespace normd {

class Rng {
 public:
  explicit Rng(uint64_t seed = 0) { Seed(seed); }

  void Seed(uint64_t seed);
  uint64_t Next();
  // Uniform in [0, 1) with 24 random bits.
  float Uniform01();
  // Uniform in [lo, hi).
  float Uniform(float lo, float hi) { return lo + (hi - lo) * Uniform01(); }

  std::array<uint64_t, 4> state() const { return s_; }
  void set_state(const std::array<uint64_t, 4>& s) { s_ = s; }

 private:
  std::array<uint64_t, 4> s_{};
};

}  // namespace normd

#endif  // NORMD_CORE_RNG_H_
