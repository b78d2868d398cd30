// The TorchScript backend: an archive written by torch.jit.save (core/jumper.py: export) with
// meta.json among its extra files.
#include <torch/script.h>

#include <algorithm>
#include <map>

#include "errors.hpp"
#include "jumper.hpp"
#include "sha256.hpp"

namespace ctm {

namespace {

std::string dtype_name(c10::ScalarType t) {
    switch (t) {
        case c10::kFloat: return "float32";
        case c10::kDouble: return "float64";
        case c10::kHalf: return "float16";
        case c10::kBFloat16: return "bfloat16";
        case c10::kLong: return "int64";
        case c10::kInt: return "int32";
        case c10::kByte: return "uint8";
        case c10::kChar: return "int8";
        case c10::kBool: return "bool";
        default: return c10::toString(t);
    }
}

// The digest core/jumper.py's payload_digest writes into meta.json: for every parameter and
// buffer in name order, "name\n dtype\n d0,d1,..\n nbytes\n" and the raw bytes.
std::string payload_digest(const torch::jit::Module& module) {
    std::map<std::string, at::Tensor> named;
    for (const auto& p : module.named_parameters(/*recurse=*/true)) named[p.name] = p.value;
    for (const auto& b : module.named_buffers(/*recurse=*/true)) named[b.name] = b.value;
    Sha256 h;
    for (const auto& [name, value] : named) {
        at::Tensor t = value.detach().to(at::kCPU).contiguous();
        std::string shape;
        for (std::int64_t i = 0; i < t.dim(); ++i)
            shape += (i ? "," : "") + std::to_string(t.size(i));
        const std::size_t nbytes = t.numel() ? t.nbytes() : 0;
        h.update(name + "\n" + dtype_name(t.scalar_type()) + "\n" + shape + "\n" +
                 std::to_string(nbytes) + "\n");
        if (nbytes) h.update(t.data_ptr(), nbytes);
    }
    return h.hex();
}

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
    if (out.meta.payload_sha256.empty())
        throw UserError(path + ": meta.json has no payload_sha256 (exported by an older "
                        "ctmkit?); rerun the 'export' stage");
    if (payload_digest(module) != out.meta.payload_sha256)
        throw UserError(path + ": jumper is corrupt or altered (SHA-256 of its tensors does not "
                        "match meta.json's payload_sha256)");

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
