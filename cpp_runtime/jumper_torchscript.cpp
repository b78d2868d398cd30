// The TorchScript backend: an archive written by torch.jit.save (core/export/jumper.py: export) with
// meta.json among its extra files, sealed by extra/archive_sha256 (core/base/integrity.py). The file
// is read once; the digest is checked on those bytes, and the same bytes are then loaded.
#include <caffe2/serialize/inline_container.h>
#include <caffe2/serialize/read_adapter_interface.h>
#include <torch/script.h>

#include <algorithm>
#include <cstring>
#include <map>
#include <set>

#include "errors.hpp"
#include "integrity.hpp"
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

// The digest core/export/jumper.py's payload_digest writes into meta.json: for every parameter and
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

// The file's bytes for PyTorchStreamReader and torch::jit::load, without a copy.
class MemoryReader final : public caffe2::serialize::ReadAdapterInterface {
public:
    explicit MemoryReader(std::shared_ptr<const std::string> data) : data_(std::move(data)) {}
    size_t size() const override { return data_->size(); }
    size_t read(uint64_t pos, void* buf, size_t n, const char* what = "") const override {
        if (pos >= data_->size()) return 0;
        n = std::min<size_t>(n, data_->size() - pos);
        std::memcpy(buf, data_->data() + pos, n);
        return n;
    }

private:
    std::shared_ptr<const std::string> data_;
};

[[noreturn]] void not_loadable(const std::string& path, const std::string& why) {
    throw UserError(path + ": not a loadable TorchScript jumper (" + why + ")");
}

[[noreturn]] void altered(const std::string& path, const std::string& why) {
    throw UserError(path + ": jumper is corrupt or altered (" + why + ")");
}

// core/base/integrity.py: check_archive. The digest record must be there and match the version-1
// digest of every other record; duplicated names and zip bombs are refused before reading.
void check_archive(const std::string& path, const std::shared_ptr<const std::string>& data) {
    try {
        caffe2::serialize::PyTorchStreamReader reader(std::make_shared<MemoryReader>(data));
        std::vector<std::string> names = reader.getAllRecords();
        if (std::set<std::string>(names.begin(), names.end()).size() != names.size())
            altered(path, "a record name appears twice");
        unsigned long long claimed = 0;
        for (const auto& name : names) claimed += reader.getRecordSize(name);
        if (claimed > kMaxExpansion * data->size() + (1u << 20))
            altered(path, "its records claim " + std::to_string(claimed) + " bytes, more than " +
                              std::to_string(kMaxExpansion) + " x the file's " +
                              std::to_string(data->size()));
        if (!reader.hasRecord(kArchiveDigestRecord) && !reader.hasRecord("extra/meta.json"))
            throw UserError(path + ": not a ctmkit jumper (no meta.json inside)");
        if (!reader.hasRecord(kArchiveDigestRecord))
            throw UserError(path + ": the jumper has no whole-archive digest (archive_sha256; "
                            "exported by an older ctmkit?); re-export it (stage 'export')");
        std::sort(names.begin(), names.end());
        Sha256 h;
        std::string stored;
        for (const auto& name : names) {
            auto [ptr, size] = reader.getRecord(name);
            const char* bytes = static_cast<const char*>(ptr.get());
            if (name == kArchiveDigestRecord) {
                stored.assign(bytes, size);
                continue;
            }
            h.update(name + "\n" + std::to_string(size) + "\n");
            if (size) h.update(bytes, size);
        }
        if (stored != h.hex())
            altered(path, "SHA-256 of its records does not match archive_sha256");
    } catch (const c10::Error& e) {
        not_loadable(path, summarize_error(e.what_without_backtrace()));
    }
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
    auto data = std::make_shared<const std::string>(read_jumper_file(path));
    check_archive(path, data);   // before TorchScript parses any of it
    torch::jit::ExtraFilesMap extra{{"meta.json", ""}};
    torch::jit::Module module;
    try {
        module = torch::jit::load(std::make_shared<MemoryReader>(data), device, extra);
    } catch (const UserError&) {
        throw;
    } catch (const c10::Error& e) {
        not_loadable(path, summarize_error(e.what_without_backtrace()));
    } catch (const std::exception& e) {
        not_loadable(path, summarize_error(e.what()));
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
