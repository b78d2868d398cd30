// meta.json of an exported jumper (core/export/jumper.py: make_meta / validate_meta).
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace ctm {

inline constexpr const char* kJumperFormat = "ctmkit.jumper";
inline constexpr int kJumperVersion = 1;

struct JumperMeta {
    std::string precond;
    std::string variant;                  // "" when null
    double sigma_data = 0.0;
    double t_min = 0.0;
    double t_max = 0.0;
    double rho = 0.0;
    std::vector<std::int64_t> shape;      // one sample, without the batch dimension
    std::int64_t num_classes = 0;         // 0: unconditional
    std::string dtype;                    // "float32" | "float64"
    std::string ctmkit_version;
    std::string payload_sha256;           // SHA-256 of the tensors ("" when absent: .pt2)

    std::int64_t sample_numel() const;
    bool is_image() const;                // [C, H, W] with C in {1, 3}
};

// Parses and validates meta.json; `where` (the model path) prefixes every message. Throws
// UserError with a one-line message on anything missing, mistyped or inconsistent.
JumperMeta parse_meta(std::string_view json_text, const std::string& where);

}  // namespace ctm
