// The AOTInductor backend: a .pt2 package written by core/export/aoti.py: export_aoti, loaded with
// torch::inductor::AOTIModelPackageLoader. meta.json is package metadata (key "meta.json");
// "ctmkit.inputs" names the entry point's positional inputs ("x,t,s" or "x,t,s,class_labels").
// The package is read once and checked against its sidecar <name>.pt2.sha256 (core/base/integrity.py)
// before anything reads it; the checked bytes are copied into a private temporary folder, which
// is also where AOTInductor extracts the library, and which is removed whatever happens.
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <sstream>

#include "errors.hpp"
#include "integrity.hpp"
#include "jumper.hpp"

namespace ctm {

namespace {

constexpr const char* kModelName = "model";   // aoti_compile_and_package's default
constexpr const char* kInputsKey = "ctmkit.inputs";
constexpr const char* kUnconditional = "x,t,s";
constexpr const char* kConditional = "x,t,s,class_labels";

// The generated model library reports a failure both as an error code (whose message the
// runner puts into its exception) and as an "Error: ..." line on std::cerr; the latter is held
// back here so that an error stays one line on stderr.
class CerrCapture {
public:
    CerrCapture() : old_(std::cerr.rdbuf(buffer_.rdbuf())) {}
    ~CerrCapture() { std::cerr.rdbuf(old_); }
    CerrCapture(const CerrCapture&) = delete;
    CerrCapture& operator=(const CerrCapture&) = delete;
    std::string text() const { return buffer_.str(); }

private:
    std::ostringstream buffer_;
    std::streambuf* old_;
};

std::string last_error_line(const std::string& captured) {
    // "Error: <message>\n" from the model library's CONVERT_EXCEPTION_TO_ERROR_CODE
    std::string line = summarize_error(captured);
    if (line.rfind("Error: ", 0) == 0) line = line.substr(7);
    return line;
}

class AOTIJumper final : public JumperBackend {
public:
    AOTIJumper(std::unique_ptr<TempDir> folder,
               std::unique_ptr<torch::inductor::AOTIModelPackageLoader> loader, bool pass_labels)
        : folder_(std::move(folder)), loader_(std::move(loader)), pass_labels_(pass_labels) {
        inputs_.reserve(4);
    }

    at::Tensor jump(const at::Tensor& x, const at::Tensor& t, const at::Tensor& s,
                    const std::optional<at::Tensor>& class_labels) override {
        inputs_.clear();
        inputs_.push_back(x);
        inputs_.push_back(t);
        inputs_.push_back(s);
        if (pass_labels_) {
            if (!class_labels) throw UserError("the class-conditional jumper needs labels");
            inputs_.push_back(*class_labels);
        }
        std::vector<at::Tensor> out;
        {
            CerrCapture capture;
            try {
                out = loader_->run(inputs_);
            } catch (const std::exception& e) {
                // the model's own message, when it printed one, beats the runner's
                // "run_func_(...) API call failed at ..."
                std::string detail = last_error_line(capture.text());
                if (detail == "unknown error") {
                    const auto* c10e = dynamic_cast<const c10::Error*>(&e);
                    detail = summarize_error(c10e ? c10e->what_without_backtrace() : e.what());
                }
                inputs_.clear();
                throw UserError("the jumper failed: " + detail);
            }
        }
        inputs_.clear();
        if (out.size() != 1)
            throw UserError("the jumper returned " + std::to_string(out.size()) +
                            " tensors, not one");
        return std::move(out[0]);
    }

    const char* kind() const override { return "aoti"; }

private:
    std::unique_ptr<TempDir> folder_;   // declared first: removed after the loader is gone
    std::unique_ptr<torch::inductor::AOTIModelPackageLoader> loader_;
    bool pass_labels_;
    std::vector<at::Tensor> inputs_;   // reused: no allocation per jump
};

[[noreturn]] void not_loadable(const std::string& path, const std::string& why) {
    throw UserError(path + ": not a loadable AOTInductor package (" + why + ")");
}

}  // namespace

LoadedJumper load_aoti_jumper(const std::string& path, const c10::Device& device) {
    // Input checks inside the generated code (dtype, sizes, strides, device of every input):
    // a package whose meta.json does not describe it then fails with a message instead of
    // reading out of bounds. Read once per process; a few comparisons per jump. The user's
    // own setting wins.
    ::setenv("AOTI_RUNTIME_CHECK_INPUTS", "1", /*overwrite=*/0);

    // 0. The whole file against its sidecar, then a private copy of the checked bytes.
    auto folder = std::make_unique<TempDir>("ctm_sample-aoti-");
    const std::string copy = folder->path() + "/jumper.pt2";
    {
        const std::string data = read_jumper_file(path);
        check_sidecar(path, data);
        std::ofstream out(copy, std::ios::binary);
        if (!out.write(data.data(), static_cast<std::streamsize>(data.size())) || !out.flush())
            throw UserError(copy + ": cannot write a temporary copy of the package");
    }

    // 1. The metadata alone (no extraction, no dlopen): foreign files fail here.
    std::unordered_map<std::string, std::string> md;
    try {
        CerrCapture capture;
        md = torch::inductor::AOTIModelPackageLoader::load_metadata_from_package(copy,
                                                                                  kModelName);
    } catch (const c10::Error& e) {
        not_loadable(path, summarize_error(e.what_without_backtrace()));
    } catch (const std::exception& e) {
        not_loadable(path, summarize_error(e.what()));
    }
    auto meta_it = md.find("meta.json");
    if (meta_it == md.end() || meta_it->second.empty())
        throw UserError(path + ": not a ctmkit jumper (no meta.json inside)");
    LoadedJumper out;
    out.meta = parse_meta(meta_it->second, path);

    auto inputs_it = md.find(kInputsKey);
    const std::string inputs = inputs_it == md.end() ? "" : inputs_it->second;
    if (inputs != kUnconditional && inputs != kConditional)
        throw UserError(path + ": the package's inputs are (" +
                        (inputs.empty() ? std::string("unknown") : inputs) +
                        "); a jumper takes (x, t, s[, class_labels])");
    const bool takes_labels = inputs == kConditional;
    if (out.meta.num_classes > 0 && !takes_labels)
        throw UserError(path + ": meta.json says num_classes = " +
                        std::to_string(out.meta.num_classes) + " but the package takes no "
                        "class_labels");
    if (out.meta.num_classes == 0 && takes_labels)
        throw UserError(path + ": meta.json says num_classes = 0 but the package takes "
                        "class_labels");

    auto dev_it = md.find("AOTI_DEVICE_KEY");
    const std::string built_for = dev_it == md.end() ? "cpu" : dev_it->second;
    if (built_for != c10::DeviceTypeName(device.type(), /*lower_case=*/true))
        throw UserError(path + ": the package was compiled for " + built_for + ", not for " +
                        "--device " + device.str());

    // 2. Extract the package (into the private folder) and load its library.
    std::unique_ptr<torch::inductor::AOTIModelPackageLoader> loader;
    try {
        CerrCapture capture;
        ScopedTmpdir tmpdir(folder->path());
        loader = std::make_unique<torch::inductor::AOTIModelPackageLoader>(
            copy, kModelName, /*run_single_threaded=*/true, /*num_runners=*/1,
            device.has_index() ? device.index() : c10::DeviceIndex(-1));
    } catch (const c10::Error& e) {
        not_loadable(path, summarize_error(e.what_without_backtrace()));
    } catch (const std::exception& e) {
        not_loadable(path, summarize_error(e.what()));
    }
    std::error_code ec;
    std::filesystem::remove(copy, ec);   // extracted: the copy is not needed any more
    out.backend = std::make_unique<AOTIJumper>(std::move(folder), std::move(loader), takes_labels);
    return out;
}

}  // namespace ctm
