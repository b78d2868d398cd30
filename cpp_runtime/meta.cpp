#include "meta.hpp"

#include <cmath>

#include "errors.hpp"
#include "json.hpp"

namespace ctm {

namespace {

constexpr const char* kKeys[] = {"format", "version", "precond", "variant", "sigma_data",
                                 "t_min", "t_max", "rho", "shape", "num_classes", "dtype",
                                 "ctmkit_version"};

// Bounds, the same in core/export/jumper.py (tests/fixtures/meta_cases.json): dimensions of one
// sample, values in one sample (guards the size arithmetic and the allocations), classes.
constexpr std::size_t kMaxShapeDims = 8;
constexpr std::int64_t kMaxSampleNumel = std::int64_t(1) << 24;
constexpr std::int64_t kMaxNumClasses = (std::int64_t(1) << 31) - 1;

[[noreturn]] void bad(const std::string& where, const std::string& what) {
    throw UserError(where + ": meta.json is inconsistent (" + what + ")");
}

double finite_number(const Json& m, const char* key, const std::string& where) {
    const Json& v = *m.find(key);
    if (!v.is_number()) bad(where, std::string(key) + " is " + json_type_name(v.type) +
                                       ", not a number");
    if (!std::isfinite(v.number)) bad(where, std::string(key) + " is not finite");
    return v.number;
}

std::string string_value(const Json& m, const char* key, const std::string& where,
                         bool nullable = false) {
    const Json& v = *m.find(key);
    if (nullable && v.is_null()) return "";
    if (!v.is_string()) bad(where, std::string(key) + " is " + json_type_name(v.type) +
                                       ", not a string");
    return v.text;
}

}  // namespace

std::int64_t JumperMeta::sample_numel() const {
    std::int64_t n = 1;
    for (auto d : shape) n *= d;
    return n;
}

bool JumperMeta::is_image() const {
    return shape.size() == 3 && (shape[0] == 1 || shape[0] == 3);
}

JumperMeta parse_meta(std::string_view json_text, const std::string& where) {
    Json m;
    try {
        m = parse_json(json_text);
    } catch (const JsonError& e) {
        throw UserError(where + ": meta.json is not valid JSON (" + e.what() + ")");
    }
    if (!m.is_object()) throw UserError(where + ": meta.json is not a JSON object");

    const Json* format = m.find("format");
    if (!format || !format->is_string() || format->text != kJumperFormat) {
        std::string got = !format ? "missing"
                          : format->is_string() ? "'" + format->text + "'"
                                                : json_type_name(format->type);
        throw UserError(where + ": not a ctmkit jumper (meta.json format is " + got + ")");
    }
    std::string missing;
    for (const char* key : kKeys)
        if (!m.find(key)) missing += (missing.empty() ? "" : ", ") + std::string(key);
    if (!missing.empty()) throw UserError(where + ": meta.json lacks " + missing);

    const Json& version = *m.find("version");
    if (!version.is_number() || version.number != kJumperVersion) {
        std::string got = version.is_number() ? version.text : json_type_name(version.type);
        throw UserError(where + ": jumper format version " + got + " is not supported (this "
                        "ctm_sample reads version " + std::to_string(kJumperVersion) + ")");
    }

    JumperMeta meta;
    meta.precond = string_value(m, "precond", where);
    meta.variant = string_value(m, "variant", where, /*nullable=*/true);
    meta.dtype = string_value(m, "dtype", where);
    meta.ctmkit_version = string_value(m, "ctmkit_version", where);
    meta.sigma_data = finite_number(m, "sigma_data", where);
    meta.t_min = finite_number(m, "t_min", where);
    meta.t_max = finite_number(m, "t_max", where);
    meta.rho = finite_number(m, "rho", where);

    if (!(meta.t_min > 0.0 && meta.t_min < meta.t_max))
        bad(where, "0 < t_min < t_max is required");
    if (!(meta.rho > 0.0)) bad(where, "rho > 0 is required");
    if (!(meta.sigma_data > 0.0)) bad(where, "sigma_data > 0 is required");
    if (meta.dtype != "float32" && meta.dtype != "float64")
        bad(where, "dtype '" + meta.dtype + "' is neither float32 nor float64");

    const Json& shape = *m.find("shape");
    if (!shape.is_array() || shape.items.empty())
        bad(where, "shape must be a non-empty list of positive integers");
    const std::string too_large = "shape is too large (at most " +
                                  std::to_string(kMaxShapeDims) + " dimensions and " +
                                  std::to_string(kMaxSampleNumel) + " values per sample)";
    std::int64_t numel = 1;
    for (const Json& d : shape.items) {
        auto n = d.as_int();
        if (!n || *n <= 0) bad(where, "shape must be a non-empty list of positive integers");
    }
    if (shape.items.size() > kMaxShapeDims) bad(where, too_large);
    for (const Json& d : shape.items) {
        auto n = d.as_int();
        if (*n > kMaxSampleNumel / numel) bad(where, too_large);
        numel *= *n;
        meta.shape.push_back(*n);
    }

    if (const Json* digest = m.find("payload_sha256")) {
        if (!digest->is_string() || digest->text.size() != 64)
            bad(where, "payload_sha256 must be a 64-digit hex string");
        meta.payload_sha256 = digest->text;
    }

    auto classes = m.find("num_classes")->as_int();
    if (!classes || *classes < 0 || *classes > kMaxNumClasses)
        bad(where, "num_classes must be an integer in 0.." + std::to_string(kMaxNumClasses));
    meta.num_classes = *classes;
    return meta;
}

}  // namespace ctm
