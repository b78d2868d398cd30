#include "sampler.hpp"

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/ops/full.h>
#include <ATen/ops/randint.h>
#include <ATen/ops/randn.h>
#include <ATen/ops/zeros.h>
#include <c10/core/InferenceMode.h>
#include <torch/cuda.h>

#include <algorithm>
#include <cmath>

#include "errors.hpp"

namespace ctm {

namespace {

std::string shape_text(at::IntArrayRef sizes) {
    std::string s = "[";
    for (std::size_t i = 0; i < sizes.size(); ++i)
        s += std::to_string(sizes[i]) + (i + 1 < sizes.size() ? ", " : "");
    return s + "]";
}

}  // namespace

void warm_up(JumperBackend& jumper, const JumperMeta& meta, const DrawSpec& spec,
             const c10::Device& device, int calls) {
    if (calls <= 0) return;
    c10::InferenceMode no_autograd;
    const auto dtype = meta.dtype == "float64" ? at::kDouble : at::kFloat;
    const auto on_device = at::TensorOptions().dtype(dtype).device(device);
    std::vector<std::int64_t> sizes{std::min(spec.batch, spec.num)};
    if (spec.num > spec.batch && spec.num % spec.batch != 0) sizes.push_back(spec.num % spec.batch);
    for (std::int64_t b : sizes) {
        std::vector<std::int64_t> shape{b};
        shape.insert(shape.end(), meta.shape.begin(), meta.shape.end());
        const at::Tensor x = at::zeros(shape, on_device);
        const at::Tensor t = at::full({b}, spec.timesteps[0], on_device);
        const at::Tensor s = at::full({b}, spec.timesteps[1], on_device);
        std::optional<at::Tensor> labels;
        if (meta.num_classes > 0)
            labels = at::zeros({b}, at::TensorOptions().dtype(at::kLong).device(device));
        for (int i = 0; i < calls; ++i) (void)jumper.jump(x, t, s, labels);
    }
    if (device.is_cuda()) torch::cuda::synchronize(device.index());
}

void draw(JumperBackend& jumper, const JumperMeta& meta, const DrawSpec& spec,
          const c10::Device& device, const BatchSink& sink) {
    c10::InferenceMode no_autograd;
    const auto dtype = meta.dtype == "float64" ? at::kDouble : at::kFloat;
    const auto cpu = at::TensorOptions().dtype(dtype);
    const auto on_device = at::TensorOptions().dtype(dtype).device(device);
    const auto& ts = spec.timesteps;
    const std::size_t K = ts.size() - 1;
    const double t_end = ts.back();
    at::Generator gen = at::detail::createCPUGenerator(spec.seed);

    for (std::int64_t lo = 0; lo < spec.num; lo += spec.batch) {
        const std::int64_t b = std::min(spec.batch, spec.num - lo);
        std::optional<at::Tensor> labels, labels_dev;
        if (meta.num_classes > 0) {
            labels = spec.class_label
                         ? at::full({b}, *spec.class_label, at::TensorOptions().dtype(at::kLong))
                         : at::randint(0, meta.num_classes, {b}, gen,
                                       at::TensorOptions().dtype(at::kLong));
            labels_dev = labels->to(device);
        }
        std::vector<std::int64_t> shape{b};
        shape.insert(shape.end(), meta.shape.begin(), meta.shape.end());
        at::Tensor x = at::randn(shape, gen, cpu).mul(ts[0]).to(device);
        for (std::size_t n = 0; n < K; ++n) {
            const double t = ts[n], s = ts[n + 1];
            const bool last = n + 1 == K;
            // gamma-sampling: land at u = max(sqrt(1 - gamma^2) s, t_K), then add noise of std
            // sqrt(s^2 - u^2) (= gamma s unless clipped) to restore noise level s
            const double target =
                (last || spec.gamma == 0.0)
                    ? s
                    : std::max(std::sqrt(1.0 - spec.gamma * spec.gamma) * s, t_end);
            at::Tensor out = jumper.jump(x, at::full({b}, t, on_device),
                                         at::full({b}, target, on_device), labels_dev);
            if (out.sizes() != x.sizes())
                throw UserError("the jumper returned a tensor of shape " +
                                shape_text(out.sizes()) + " for x of shape " +
                                shape_text(x.sizes()));
            x = out;
            if (!last && spec.gamma > 0.0) {   // x + std * noise, as in Python
                at::Tensor noise =
                    at::randn(x.sizes(), gen, at::TensorOptions().dtype(x.scalar_type()));
                x = x.add(noise.to(device).mul(std::sqrt(s * s - target * target)));
            }
        }
        sink(x.to(at::kFloat).cpu().contiguous(), labels);
    }
}

}  // namespace ctm
