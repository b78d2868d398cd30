// A small JSON reader for the jumper's meta.json (RFC 8259 values, plus Python's NaN /
// Infinity / -Infinity literals, which json.dumps writes for non-finite floats).
#pragma once

#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace ctm {

struct JsonError : std::runtime_error {
    using std::runtime_error::runtime_error;
};

struct Json {
    enum class Type { Null, Bool, Number, String, Array, Object };

    Type type = Type::Null;
    bool boolean = false;
    double number = 0.0;
    bool integral = false;   // a Number written without fraction or exponent
    std::string text;        // String: the decoded value; Number: the literal as written
    std::vector<Json> items;                             // Array
    std::vector<std::pair<std::string, Json>> members;   // Object, in file order

    bool is_null() const { return type == Type::Null; }
    bool is_number() const { return type == Type::Number; }
    bool is_string() const { return type == Type::String; }
    bool is_array() const { return type == Type::Array; }
    bool is_object() const { return type == Type::Object; }

    // The member named `key` (the last one if repeated, as Python's json does), or nullptr.
    const Json* find(std::string_view key) const;
    // The exact integer value of an integral Number that fits int64, else nullopt.
    std::optional<std::int64_t> as_int() const;
};

// Parses one JSON value filling the whole text (surrounding whitespace allowed); throws
// JsonError naming the byte offset of the first problem.
Json parse_json(std::string_view text);

// "object", "array", ... for messages.
const char* json_type_name(Json::Type type);

}  // namespace ctm
