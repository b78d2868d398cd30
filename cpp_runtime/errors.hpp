// One exception type for anything the user can fix (a bad flag, a missing or corrupt model
// file, an inconsistent meta.json). main() prints it as one "ctm_sample: error: ..." line and
// exits with status 2, like core.base.errors.UserError on the Python side.
#pragma once

#include <stdexcept>
#include <string>

namespace ctm {

struct UserError : std::runtime_error {
    using std::runtime_error::runtime_error;
};

}  // namespace ctm
