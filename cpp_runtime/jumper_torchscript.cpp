// The TorchScript backend: an archive written by torch.jit.save (core/jumper.py: export) with
// meta.json among its extra files.
#include <torch/script.h>

#include "errors.hpp"
#include "jumper.hpp"

namespace ctm {

namespace {

class TorchScriptJumper final : public JumperBackend {
public:
    TorchScriptJumper(torch::jit::Module module, bool pass_labels)
        : module_(std::move(module)), pass_labels_(pass_labels) {}

    at::Tensor jump(const at::Tensor& x, const at::Tensor& t, const at::Tensor& s,
                    const std::optional<at::Tensor>& class_labels) override {
        std::vector<c10::IValue> inputs{x, t, s};
        if (pass_labels_) inputs.emplace_back(class_labels ? c10::IValue(*class_labels)
                                                           : c10::IValue());
        c10::IValue out = module_.forward(std::move(inputs));
        if (!out.isTensor())
            throw UserError("the jumper returned " + out.tagKind() + ", not a tensor");
        return out.toTensor();
    }

    const char* kind() const override { return "torchscript"; }

private:
    torch::jit::Module module_;
    bool pass_labels_;
};

}  // namespace

LoadedJumper load_torchscript_jumper(const std::string& path, const c10::Device& device) {
    torch::jit::ExtraFilesMap extra{{"meta.json", ""}};
    torch::jit::Module module;
    try {
        module = torch::jit::load(path, device, extra);
    } catch (const c10::Error& e) {
        throw UserError(path + ": not a loadable TorchScript jumper (" +
                        summarize_error(e.what_without_backtrace()) + ")");
    } catch (const std::exception& e) {
        throw UserError(path + ": not a loadable TorchScript jumper (" +
                        summarize_error(e.what()) + ")");
    }
    if (extra["meta.json"].empty())
        throw UserError(path + ": not a ctmkit jumper (no meta.json inside)");
    LoadedJumper out;
    out.meta = parse_meta(extra["meta.json"], path);

    auto method = module.find_method("forward");
    if (!method) throw UserError(path + ": the TorchScript module has no forward method");
    const auto& args = method->function().getSchema().arguments();   // self, x, t, s, [labels]
    std::size_t n_args = args.empty() ? 0 : args.size() - 1;
    if (n_args < 3 || n_args > 4)
        throw UserError(path + ": forward takes " + std::to_string(n_args) +
                        " arguments; a jumper takes (x, t, s, class_labels=None)");
    if (out.meta.num_classes > 0 && n_args < 4)
        throw UserError(path + ": meta.json says num_classes = " +
                        std::to_string(out.meta.num_classes) +
                        " but forward takes no class_labels");
    module.eval();
    out.backend = std::make_unique<TorchScriptJumper>(std::move(module), n_args == 4 &&
                                                      out.meta.num_classes > 0);
    return out;
}

}  // namespace ctm
