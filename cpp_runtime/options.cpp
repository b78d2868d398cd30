#include "options.hpp"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <map>
#include <set>
#include <sstream>

#include "errors.hpp"

namespace ctm {

namespace {

[[noreturn]] void bad_value(const std::string& flag, const std::string& what,
                            const std::string& got) {
    throw UserError(flag + ": expected " + what + ", got '" + got + "'");
}

template <typename Int>
Int parse_int(const std::string& flag, const std::string& text, Int min, const char* what,
              std::optional<Int> max = std::nullopt) {
    Int v{};
    const char* b = text.data();
    const char* e = b + text.size();
    auto r = std::from_chars(b, e, v);
    if (text.empty() || r.ec != std::errc() || r.ptr != e || v < min) bad_value(flag, what, text);
    if (max && v > *max)
        throw UserError(flag + ": at most " + std::to_string(*max) + ", got '" + text + "'");
    return v;
}

double parse_double(const std::string& flag, const std::string& text, const char* what) {
    double v = 0.0;
    const char* b = text.data();
    const char* e = b + text.size();
    auto r = std::from_chars(b, e, v);
    if (text.empty() || r.ec != std::errc() || r.ptr != e || !std::isfinite(v))
        bad_value(flag, what, text);
    return v;
}

bool is_valid_device(const std::string& d) {
    if (d == "cpu" || d == "cuda") return true;
    if (d.rfind("cuda:", 0) != 0 || d.size() == 5) return false;
    for (std::size_t i = 5; i < d.size(); ++i)
        if (d[i] < '0' || d[i] > '9') return false;
    return d.size() <= 8;
}

}  // namespace

const char* usage_text() {
    return
        "usage: ctm_sample --model JUMPER.pt|JUMPER.pt2 --out SAMPLES.npy [options]\n"
        "\n"
        "Draws samples from an exported ctmkit jumper f(x, t, s) with CTM's sampler, with the\n"
        "same random numbers as ctmkit's Python sampler (core/export/sampling.py) for the same seed.\n"
        "\n"
        "  --model PATH        exported jumper: .pt2 AOTInductor package, anything else a\n"
        "                      TorchScript archive (both with meta.json)\n"
        "  --out PATH          samples as .npy (float32, [num, *shape]); image shapes\n"
        "                      [1|3, H, W] also get <stem>.png, conditional models\n"
        "                      <stem>.labels.npy (int64); see --format\n"
        "  --format F          npy (default: as --out says); npz: one .npz as ADM's\n"
        "                      evaluator.py reads it (arr_0 uint8 [N, H, W, C] from\n"
        "                      ((x + 1) * 127.5).clamp(0, 255), arr_1 int64 labels of\n"
        "                      conditional models); png: --out names a folder (new, or one\n"
        "                      ctm_sample or ctmkit wrote) of one PNG per sample in EDM's\n"
        "                      layout (000000/000000.png, 1,000 a sub-folder) from\n"
        "                      (x * 127.5 + 128).clip(0, 255), for EDM's fid.py; image\n"
        "                      models only\n"
        "  --steps K           number of jumps on EDM's rho grid, 1..10000 (default 2)\n"
        "  --timesteps LIST    explicit t0,t1,...,tK, strictly decreasing within the model's\n"
        "                      [t_min, t_max] (overrides the rho grid)\n"
        "  --num N             number of samples, at most 2^31-1 (default 1000)\n"
        "  --batch B           samples per forward pass, at most 2^20 and 2^28 values\n"
        "                      (default 500)\n"
        "  --seed S            seed of the random numbers, 0..2^64-1 (default 0)\n"
        "  --gamma G           CTM gamma-sampling, 0 (deterministic) .. 1 (CM-style\n"
        "                      multistep) (default 0)\n"
        "  --class-label C     class of every sample, 0 <= C < num_classes (default: random\n"
        "                      labels for class-conditional models)\n"
        "  --device D          cpu, cuda or cuda:N (default cpu)\n"
        "  --threads T         CPU threads for LibTorch, 1..1024 (default: LibTorch's\n"
        "                      choice)\n"
        "  --warmup W          untimed jumps on a zero batch before sampling, per batch\n"
        "                      size; no random numbers, same samples (default 2; 0: none;\n"
        "                      at most 100)\n"
        "  --timing            print load / warm-up / sampling / write times on stderr\n"
        "  --quiet             no progress line (shown when stderr is a terminal) and no\n"
        "                      summary line on stderr\n"
        "  --help              this text\n"
        "\n"
        "Errors print one line 'ctm_sample: error: ...' on stderr and exit with status 2;\n"
        "no output file is written then.\n";
}

Options parse_options(int argc, const char* const* argv) {
    Options opt;
    for (int i = 1; i < argc; ++i) {
        std::string a = argv[i];
        if (a == "--help" || a == "-h") {
            opt.help = true;
            return opt;
        }
    }
    static const std::set<std::string> kValueFlags = {
        "--model", "--out", "--format", "--steps", "--num", "--batch", "--seed", "--device",
        "--timesteps", "--gamma", "--class-label", "--threads", "--warmup"};
    static const std::set<std::string> kSwitches = {"--timing", "--quiet"};
    std::set<std::string> seen;
    for (int i = 1; i < argc; ++i) {
        std::string arg = argv[i];
        std::string flag = arg, value;
        bool inline_value = false;
        if (auto eq = arg.find('='); arg.rfind("--", 0) == 0 && eq != std::string::npos) {
            flag = arg.substr(0, eq);
            value = arg.substr(eq + 1);
            inline_value = true;
        }
        if (arg.rfind("-", 0) != 0 || arg == "-")
            throw UserError("unexpected argument '" + arg + "' (see --help)");
        if (kSwitches.count(flag)) {
            if (inline_value) throw UserError(flag + " takes no value");
            (flag == "--timing" ? opt.timing : opt.quiet) = true;
            continue;
        }
        if (!kValueFlags.count(flag)) throw UserError("unknown flag '" + flag + "' (see --help)");
        if (!seen.insert(flag).second) throw UserError(flag + " given twice");
        if (!inline_value) {
            if (i + 1 >= argc) throw UserError(flag + " needs a value");
            value = argv[++i];
        }
        if (flag == "--model") {
            if (value.empty()) bad_value(flag, "a file path", value);
            opt.model = value;
        } else if (flag == "--out") {
            if (value.empty()) bad_value(flag, "a file path", value);
            opt.out = value;
        } else if (flag == "--format") {
            if (value != "npy" && value != "npz" && value != "png")
                bad_value(flag, "npy, npz or png", value);
            opt.format = value;
        } else if (flag == "--steps") {
            opt.steps = parse_int<std::int64_t>(flag, value, 1, "an integer >= 1", kMaxSteps);
            opt.steps_given = true;
        } else if (flag == "--num") {
            opt.num = parse_int<std::int64_t>(flag, value, 1, "an integer >= 1", kMaxNum);
        } else if (flag == "--batch") {
            opt.batch = parse_int<std::int64_t>(flag, value, 1, "an integer >= 1", kMaxBatch);
        } else if (flag == "--seed") {
            opt.seed = parse_int<std::uint64_t>(flag, value, 0, "an integer in 0..2^64-1");
        } else if (flag == "--threads") {
            opt.threads = parse_int<int>(flag, value, 1, "an integer >= 1", kMaxThreads);
        } else if (flag == "--warmup") {
            opt.warmup = parse_int<int>(flag, value, 0, "an integer >= 0", kMaxWarmup);
        } else if (flag == "--class-label") {
            opt.class_label = parse_int<std::int64_t>(flag, value, 0, "an integer >= 0");
        } else if (flag == "--gamma") {
            opt.gamma = parse_double(flag, value, "a number in [0, 1]");
            if (opt.gamma < 0.0 || opt.gamma > 1.0) bad_value(flag, "a number in [0, 1]", value);
        } else if (flag == "--device") {
            if (!is_valid_device(value)) bad_value(flag, "cpu, cuda or cuda:N", value);
            opt.device = value;
        } else if (flag == "--timesteps") {
            std::vector<double> ts;
            std::stringstream ss(value);
            std::string item;
            while (std::getline(ss, item, ',')) {
                if (ts.size() > static_cast<std::size_t>(kMaxSteps))
                    throw UserError(flag + ": at most " + std::to_string(kMaxSteps + 1) +
                                    " times");
                ts.push_back(parse_double(flag, item, "comma-separated positive numbers"));
            }
            if (!value.empty() && value.back() == ',')
                bad_value(flag, "comma-separated positive numbers", value);
            if (ts.size() < 2)
                throw UserError(flag + ": needs at least two times t0,...,tK, got '" + value +
                                "'");
            for (std::size_t k = 0; k < ts.size(); ++k) {
                if (ts[k] <= 0.0) bad_value(flag, "positive times", value);
                if (k > 0 && !(ts[k] < ts[k - 1]))
                    throw UserError(flag + ": times must be strictly decreasing, got '" + value +
                                    "'");
            }
            opt.timesteps = std::move(ts);
        }
    }
    if (opt.model.empty()) throw UserError("--model is required (see --help)");
    if (opt.out.empty()) throw UserError("--out is required (see --help)");
    if (opt.timesteps && opt.steps_given &&
        opt.steps != static_cast<std::int64_t>(opt.timesteps->size()) - 1)
        throw UserError("--steps " + std::to_string(opt.steps) + " disagrees with --timesteps (" +
                        std::to_string(opt.timesteps->size() - 1) + " jumps)");
    return opt;
}

std::vector<double> rho_grid(std::int64_t steps, double t_min, double t_max, double rho) {
    if (steps < 1) throw std::invalid_argument("rho_grid: steps must be >= 1");
    const double a = std::pow(t_max, 1.0 / rho), b = std::pow(t_min, 1.0 / rho);
    std::vector<double> ts(static_cast<std::size_t>(steps) + 1);
    for (std::int64_t i = 0; i <= steps; ++i)   // same operation order as the Python
        ts[i] = std::pow(a + static_cast<double>(i) / static_cast<double>(steps) * (b - a), rho);
    ts.front() = t_max;
    ts.back() = t_min;
    return ts;
}

void check_against_meta(const Options& opt, const JumperMeta& meta) {
    const std::int64_t batch = std::min(opt.batch, opt.num);
    if (batch > kMaxBatchValues / meta.sample_numel())
        throw UserError("--batch: at most " + std::to_string(kMaxBatchValues) +
                        " values per batch (" + std::to_string(kMaxBatchValues /
                                                               meta.sample_numel()) +
                        " samples of this model), got " + std::to_string(batch));
    if (opt.class_label) {
        if (meta.num_classes == 0)
            throw UserError("--class-label: the model is unconditional (num_classes = 0)");
        if (*opt.class_label >= meta.num_classes)
            throw UserError("--class-label: expected 0 <= C < " +
                            std::to_string(meta.num_classes) + ", got " +
                            std::to_string(*opt.class_label));
    }
}

std::vector<double> resolve_timesteps(const Options& opt, const JumperMeta& meta) {
    std::vector<double> ts = opt.timesteps ? *opt.timesteps
                                           : rho_grid(opt.steps, meta.t_min, meta.t_max, meta.rho);
    if (ts.front() > meta.t_max * (1 + 1e-9) || ts.back() < meta.t_min * (1 - 1e-9)) {
        std::ostringstream msg;
        msg.precision(17);
        msg << "--timesteps: times must lie in the model's [t_min, t_max] = [" << meta.t_min
            << ", " << meta.t_max << "]";
        throw UserError(msg.str());
    }
    return ts;
}

}  // namespace ctm
