// A loaded jumper: f(x, t, s[, class_labels]) behind a small interface; load_jumper() picks
// the backend by file extension: .pt2 -> AOTInductor package (jumper_aoti.cpp), anything else
// -> TorchScript archive (jumper_torchscript.cpp).
#pragma once

#include <ATen/Tensor.h>
#include <c10/core/Device.h>

#include <memory>
#include <optional>
#include <string>

#include "meta.hpp"

namespace ctm {

class JumperBackend {
public:
    virtual ~JumperBackend() = default;
    // f(x, t, s, class_labels): x [B, *shape] of the jumper's dtype on its device; t, s [B] of
    // x's dtype; class_labels [B] int64 or nullopt. Returns a tensor shaped like x.
    virtual at::Tensor jump(const at::Tensor& x, const at::Tensor& t, const at::Tensor& s,
                            const std::optional<at::Tensor>& class_labels) = 0;
    virtual const char* kind() const = 0;
};

struct LoadedJumper {
    std::unique_ptr<JumperBackend> backend;
    JumperMeta meta;
};

// Loads and validates a jumper file; one-line UserError for a missing, truncated or foreign
// file and for a missing or inconsistent meta.json.
LoadedJumper load_jumper(const std::string& path, const c10::Device& device);

// Backends (one source file each).
LoadedJumper load_torchscript_jumper(const std::string& path, const c10::Device& device);
LoadedJumper load_aoti_jumper(const std::string& path, const c10::Device& device);

// One readable line out of a LibTorch / TorchScript exception message.
std::string summarize_error(const std::string& message);

}  // namespace ctm
