// Command line of ctm_sample and the time grid it samples on.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "meta.hpp"

namespace ctm {

// Bounds of the command line (one "<flag>: at most N" line beyond them): jumps, samples,
// samples per batch and values per batch (batch x the model's sample size), threads, warm-up
// jumps.
inline constexpr std::int64_t kMaxSteps = 10000;
inline constexpr std::int64_t kMaxNum = (std::int64_t(1) << 31) - 1;
inline constexpr std::int64_t kMaxBatch = std::int64_t(1) << 20;
inline constexpr std::int64_t kMaxBatchValues = std::int64_t(1) << 28;
inline constexpr int kMaxThreads = 1024;
inline constexpr int kMaxWarmup = 100;

struct Options {
    std::string model;
    std::string out;
    std::string format = "npy";             // npy | npz | png (cpp_runtime/sample_files.hpp)
    std::int64_t steps = 2;                 // core/host/config.py SampleCfg defaults
    bool steps_given = false;
    std::int64_t num = 1000;
    std::int64_t batch = 500;
    std::uint64_t seed = 0;
    std::string device = "cpu";
    std::optional<std::vector<double>> timesteps;
    double gamma = 0.0;
    std::optional<std::int64_t> class_label;
    int threads = 0;                        // 0: LibTorch's default
    int warmup = 2;                         // untimed warm-up jumps per batch size
    bool timing = false;
    bool quiet = false;
    bool help = false;
};

// Parses argv[1..]; throws UserError (one line) on an unknown flag, a missing or malformed
// value, or a value out of range. With --help anywhere, returns {help = true} at once.
Options parse_options(int argc, const char* const* argv);

const char* usage_text();

// EDM's rho-schedule (core/diffusion/schedules.py: rho_grid): K + 1 decreasing times from t_max to
// t_min, computed in double with the endpoints exact.
std::vector<double> rho_grid(std::int64_t steps, double t_min, double t_max, double rho);

// The time grid for this run (--timesteps or the rho grid), after the checks that need the
// model's meta: the grid lies within [t_min, t_max], --steps agrees with --timesteps, and
// --class-label is in range. Throws UserError.
std::vector<double> resolve_timesteps(const Options& opt, const JumperMeta& meta);
void check_against_meta(const Options& opt, const JumperMeta& meta);

}  // namespace ctm
