// Drawing samples with CTM's sampler under ctmkit's random-number convention
// (core/export/sampling.py: draw, plugins/samplers.py: CTMSampler).
#pragma once

#include <ATen/Tensor.h>
#include <c10/core/Device.h>

#include <cstdint>
#include <functional>
#include <optional>
#include <vector>

#include "jumper.hpp"

namespace ctm {

struct DrawSpec {
    std::vector<double> timesteps;            // t_0 > ... > t_K
    double gamma = 0.0;
    std::int64_t num = 1;
    std::int64_t batch = 1;
    std::uint64_t seed = 0;
    std::optional<std::int64_t> class_label;  // fixed label for conditional models
};

// Called once per batch, in order, with the samples as a contiguous float32 CPU tensor
// [b, *shape] and, for class-conditional models, the labels as int64 CPU tensor [b].
using BatchSink = std::function<void(const at::Tensor& samples,
                                     const std::optional<at::Tensor>& labels)>;

// One CPU generator seeded once with spec.seed; for each batch in order: (1) labels
// randint(0, num_classes, [b]) when the model is conditional and no label is fixed;
// (2) x = randn([b, *shape], dtype) * t_0; (3) for n = 0..K-1 a jump from t_n to t_{n+1};
// with gamma > 0, every jump but the last lands at u = max(sqrt(1 - gamma^2) t_{n+1}, t_K)
// and is followed by x += sqrt(t_{n+1}^2 - u^2) randn(x.shape).
void draw(JumperBackend& jumper, const JumperMeta& meta, const DrawSpec& spec,
          const c10::Device& device, const BatchSink& sink);

// Untimed warm-up before draw(): `calls` jumps t_0 -> t_1 on x = 0 for each batch size that
// draw() will use (spec.batch, and the smaller last batch when num % batch != 0), labels 0 for
// conditional models, outputs discarded. It draws no random numbers, so the samples are the
// same with or without it; it takes TorchScript's profiling runs and graph optimisation (the
// first two calls per input shape) and first-call allocations out of the sampling loop.
void warm_up(JumperBackend& jumper, const JumperMeta& meta, const DrawSpec& spec,
             const c10::Device& device, int calls);

}  // namespace ctm
