// ctm_sample: draws samples from an exported ctmkit jumper (see cpp_runtime/README.md).
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <torch/cuda.h>
#include <torch/csrc/jit/runtime/jit_exception.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <iostream>
#include <set>
#include <string>
#include <vector>

#include "errors.hpp"
#include "jumper.hpp"
#include "options.hpp"
#include "output.hpp"
#include "sample_files.hpp"
#include "sampler.hpp"

namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) {
    return std::chrono::duration<double>(Clock::now() - t0).count();
}

bool g_progress_open = false;   // a "\r..." progress line is on the terminal

// LibTorch warnings are held back and printed after a successful run, so that an error is
// always exactly one line on stderr.
class DeferredWarnings final : public c10::WarningHandler {
public:
    void process(const c10::Warning& warning) override {
        std::string line = ctm::summarize_error(warning.msg());
        if (seen_.insert(line).second) lines_.push_back(line);
    }
    void flush() {
        for (const auto& line : lines_) std::cerr << "ctm_sample: warning: " << line << "\n";
        lines_.clear();
    }

private:
    std::set<std::string> seen_;
    std::vector<std::string> lines_;
};

DeferredWarnings g_warnings;

// A "\r"-updated progress line, shown only when stderr is a terminal: in logs (and for
// scripts) an error stays exactly one line on stderr.
class Progress {
public:
    Progress(std::int64_t total, bool enabled)
        : total_(total), enabled_(enabled && ::isatty(STDERR_FILENO) == 1),
          t0_(Clock::now()) {}

    void update(std::int64_t done) {
        if (!enabled_) return;
        std::fprintf(stderr, "\rctm_sample: %lld/%lld samples, %.1f s", (long long)done,
                     (long long)total_, seconds_since(t0_));
        g_progress_open = done < total_;
        if (!g_progress_open) std::fputc('\n', stderr);
        std::fflush(stderr);
    }

private:
    std::int64_t total_;
    bool enabled_;
    Clock::time_point t0_;
};

c10::Device pick_device(const std::string& name) {
    c10::Device device(name);
    if (device.is_cuda()) {
        auto count = torch::cuda::device_count();
        if (count == 0)
            throw ctm::UserError("--device " + name + ": no CUDA GPU is available");
        if (device.has_index() && device.index() >= count)
            throw ctm::UserError("--device " + name + ": only " + std::to_string(count) +
                                 " CUDA GPU(s) available");
    }
    return device;
}

// Runs fn; LibTorch / TorchScript exceptions from the jumper become one-line UserErrors.
template <typename Fn>
void guard_jumper_errors(Fn&& fn) {
    try {
        fn();
    } catch (const ctm::UserError&) {
        throw;
    } catch (const torch::jit::JITException& e) {
        throw ctm::UserError("the jumper failed: " +
                             ctm::summarize_error(e.getOriginalMsg().value_or(e.what())));
    } catch (const c10::Error& e) {
        throw ctm::UserError("the jumper failed: " +
                             ctm::summarize_error(e.what_without_backtrace()));
    }
}

int run(int argc, char** argv) {
    ctm::Options opt = ctm::parse_options(argc, argv);
    if (opt.help) {
        std::cout << ctm::usage_text();
        return 0;
    }
    const bool npy = opt.format == "npy";
    if (opt.format == "png") {   // a folder: "samples/" names "samples"
        while (opt.out.size() > 1 && opt.out.back() == '/') opt.out.pop_back();
        ctm::check_png_folder(opt.out, opt.model);
    } else {
        ctm::check_output_path(opt.out);
        ctm::check_not_input(opt.out, opt.model);
    }
    c10::Device device = pick_device(opt.device);
    if (opt.threads > 0) at::set_num_threads(opt.threads);

    auto t_load = Clock::now();
    ctm::LoadedJumper jumper = ctm::load_jumper(opt.model, device);
    const ctm::JumperMeta& meta = jumper.meta;
    ctm::check_against_meta(opt, meta);
    if (!npy && !meta.is_image()) {
        std::string shape;
        for (auto d : meta.shape) shape += (shape.empty() ? "" : ", ") + std::to_string(d);
        throw ctm::UserError("--format " + opt.format + ": an image format; this model makes "
                             "samples of shape [" + shape + "], not [1|3, H, W]");
    }
    for (const auto& [wanted, suffix] : {std::pair{meta.num_classes > 0, ".labels.npy"},
                                         std::pair{meta.is_image(), ".png"}}) {
        if (!wanted || !npy) continue;
        const std::string sibling = ctm::sibling_path(opt.out, suffix);
        ctm::check_output_path(sibling);
        ctm::check_not_input(sibling, opt.model, "--out's " + std::string(suffix));
    }
    ctm::DrawSpec spec;
    spec.timesteps = ctm::resolve_timesteps(opt, meta);
    spec.gamma = opt.gamma;
    spec.num = opt.num;
    spec.batch = opt.batch;
    spec.seed = opt.seed;
    spec.class_label = opt.class_label;
    double load_s = seconds_since(t_load);

    // Untimed warm-up (no random numbers): TorchScript profiles and optimises its graph on the
    // first calls; AOTInductor and the allocator have first-call costs too.
    auto t_warm = Clock::now();
    guard_jumper_errors([&] { ctm::warm_up(*jumper.backend, meta, spec, device, opt.warmup); });
    double warmup_s = seconds_since(t_warm);

    // Samples stream into a temporary .npy (or .npz, or folder of PNGs) beside --out; labels
    // and the image grid are kept.
    const std::int64_t numel = meta.sample_numel();
    std::vector<std::int64_t> out_shape{opt.num};
    out_shape.insert(out_shape.end(), meta.shape.begin(), meta.shape.end());
    std::optional<ctm::AtomicFile> samples_file;
    std::optional<ctm::NpzWriter> npz_file;
    std::optional<ctm::PngFolderWriter> png_folder;
    if (npy) {
        samples_file.emplace(opt.out);
        std::string header = ctm::npy_header("<f4", out_shape);
        samples_file->write(header.data(), header.size());
    } else if (opt.format == "npz") {
        npz_file.emplace(opt.out, opt.num, int(meta.shape[0]), int(meta.shape[1]),
                         int(meta.shape[2]), meta.num_classes > 0);
    } else {
        png_folder.emplace(opt.out, int(meta.shape[0]), int(meta.shape[1]), int(meta.shape[2]));
    }
    const bool image = meta.is_image() && npy;
    const std::int64_t grid_images = image ? std::min<std::int64_t>(opt.num, 64) : 0;
    std::vector<float> grid_data;
    grid_data.reserve(static_cast<std::size_t>(grid_images * numel));
    std::vector<std::int64_t> labels;
    std::int64_t done = 0;
    double write_s = 0.0;
    double first_batch_s = 0.0;   // without --warmup, the first batch carries TorchScript's
                                  // profiling runs
    std::int64_t first_b = 0;
    Progress progress(opt.num, !opt.quiet);
    Clock::time_point t_sample;

    auto sink = [&](const at::Tensor& x, const std::optional<at::Tensor>& y) {
        auto t_write = Clock::now();
        if (done == 0) {
            first_batch_s = std::chrono::duration<double>(t_write - t_sample).count();
            first_b = x.size(0);
        }
        const float* p = x.data_ptr<float>();
        const std::int64_t n = x.numel();
        for (std::int64_t i = 0; i < n; ++i)
            if (!std::isfinite(p[i]))
                throw ctm::UserError("the jumper produced NaN/Inf; " + opt.out +
                                     " was not written");
        const std::int64_t b = x.size(0);
        if (samples_file) samples_file->write(p, static_cast<std::size_t>(n) * sizeof(float));
        for (std::int64_t k = 0; k < b && npz_file; ++k) npz_file->add(p + k * numel);
        for (std::int64_t k = 0; k < b && png_folder; ++k) png_folder->add(p + k * numel);
        const std::int64_t keep = std::min(b, grid_images - done);
        if (keep > 0) grid_data.insert(grid_data.end(), p, p + keep * numel);
        if (y) {
            const std::int64_t* q = y->data_ptr<std::int64_t>();
            labels.insert(labels.end(), q, q + y->numel());
        }
        done += b;
        write_s += seconds_since(t_write);
        progress.update(done);
    };
    t_sample = Clock::now();
    guard_jumper_errors([&] { ctm::draw(*jumper.backend, meta, spec, device, sink); });
    double sample_s = seconds_since(t_sample) - write_s;

    auto t_write = Clock::now();
    std::optional<ctm::AtomicFile> labels_file, png_file;
    if (meta.num_classes > 0 && npy) {
        labels_file.emplace(ctm::sibling_path(opt.out, ".labels.npy"));
        std::string h = ctm::npy_header("<i8", {opt.num});
        labels_file->write(h.data(), h.size());
        labels_file->write(labels.data(), labels.size() * sizeof(std::int64_t));
    }
    if (image) {
        ctm::Image grid = ctm::image_grid(grid_data.data(), grid_images, int(meta.shape[0]),
                                          int(meta.shape[1]), int(meta.shape[2]));
        auto png = ctm::encode_png(grid.pixels, grid.width, grid.height, grid.channels);
        png_file.emplace(ctm::sibling_path(opt.out, ".png"));
        png_file->write(png.data(), png.size());
    }
    if (labels_file) labels_file->commit();
    if (png_file) png_file->commit();
    if (samples_file) samples_file->commit();   // last: it appears once everything is in place
    if (npz_file) npz_file->commit(labels);
    if (png_folder) png_folder->commit();
    write_s += seconds_since(t_write);

    g_warnings.flush();
    if (opt.timing) {
        // warm_per_sample: the batches after the first one (nan with a single batch)
        double warm = opt.num > first_b ? (sample_s - first_batch_s) / double(opt.num - first_b)
                                        : std::nan("");
        std::fprintf(stderr,
                     "ctm_sample: timing: load=%.6fs warmup=%.6fs sample=%.6fs write=%.6fs "
                     "per_sample=%.9fs warm_per_sample=%.9fs num=%lld steps=%zu backend=%s\n",
                     load_s, warmup_s, sample_s, write_s, sample_s / double(opt.num), warm,
                     (long long)opt.num, spec.timesteps.size() - 1, jumper.backend->kind());
    }
    if (!opt.quiet)
        std::fprintf(stderr, "ctm_sample: %lld samples, %zu steps -> %s\n", (long long)opt.num,
                     spec.timesteps.size() - 1, opt.out.c_str());
    return 0;
}

int fail(const std::string& message) {
    if (g_progress_open) std::fputc('\n', stderr);
    std::string line = message;
    for (char& c : line)
        if (c == '\n' || c == '\r') c = ' ';
    std::fprintf(stderr, "ctm_sample: error: %s\n", line.c_str());
    return 2;
}

}  // namespace

int main(int argc, char** argv) {
    ctm::install_cleanup_handlers();
    c10::WarningUtils::set_warning_handler(&g_warnings);
    try {
        return run(argc, argv);
    } catch (const ctm::UserError& e) {
        return fail(e.what());
    } catch (const torch::jit::JITException& e) {
        return fail(ctm::summarize_error(e.getOriginalMsg().value_or(e.what())));
    } catch (const c10::Error& e) {
        return fail(ctm::summarize_error(e.what_without_backtrace()));
    } catch (const std::exception& e) {
        return fail(ctm::summarize_error(e.what()));
    } catch (...) {
        return fail("unknown error");
    }
}
