#include "integrity.hpp"

#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "errors.hpp"
#include "sha256.hpp"

namespace ctm {

namespace fs = std::filesystem;

namespace {

constexpr std::size_t kMaxSidecarBytes = 4096;

bool is_hex64(const std::string& s) {
    if (s.size() != 64) return false;
    for (char c : s)
        if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'))) return false;
    return true;
}

std::string file_name(const std::string& path) { return fs::path(path).filename().string(); }

}  // namespace

std::string read_jumper_file(const std::string& path) {
    std::error_code ec;
    if (!fs::exists(path, ec)) throw UserError(path + ": jumper file not found");
    if (!fs::is_regular_file(path, ec)) throw UserError(path + ": not a regular file");
    std::ifstream in(path, std::ios::binary);
    std::ostringstream buf;
    if (!in || !(buf << in.rdbuf()))
        throw UserError(path + ": cannot read the jumper file (" + std::strerror(errno) + ")");
    return std::move(buf).str();
}

std::string sidecar_path(const std::string& path) { return path + ".sha256"; }

void check_sidecar(const std::string& path, const std::string& data) {
    const std::string side = sidecar_path(path);
    std::error_code ec;
    if (!fs::exists(side, ec))
        throw UserError(path + ": no digest file " + file_name(side) + " beside it (exported by "
                        "an older ctmkit, or moved without it?); re-export it (stage 'export')");
    if (!fs::is_regular_file(side, ec))   // a FIFO would block the open
        throw UserError(side + ": the digest file is not a regular file");
    std::ifstream in(side, std::ios::binary);
    if (!in) throw UserError(side + ": cannot read the digest file");
    std::string text(kMaxSidecarBytes + 1, '\0');
    in.read(text.data(), static_cast<std::streamsize>(text.size()));
    text.resize(static_cast<std::size_t>(in.gcount()));
    std::istringstream fields(text);
    std::string hex;
    fields >> hex;
    if (text.size() > kMaxSidecarBytes || !is_hex64(hex))
        throw UserError(side + ": not a SHA-256 digest file ('<64 hex digits>  <name>')");
    Sha256 h;
    h.update(data);
    if (h.hex() != hex)
        throw UserError(path + ": jumper is corrupt or altered (its SHA-256 does not match " +
                        file_name(side) + ")");
}

TempDir::TempDir(const std::string& prefix) {
    const char* base = std::getenv("TMPDIR");
    std::string tmpl = std::string(base && *base ? base : "/tmp") + "/" + prefix + "XXXXXX";
    if (::mkdtemp(tmpl.data()) == nullptr)
        throw UserError(tmpl + ": cannot create a temporary folder (" + std::strerror(errno) +
                        ")");
    path_ = tmpl;
}

TempDir::~TempDir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
}

ScopedTmpdir::ScopedTmpdir(const std::string& folder) {
    if (const char* old = std::getenv("TMPDIR")) {
        had_old_ = true;
        old_ = old;
    }
    ::setenv("TMPDIR", folder.c_str(), 1);
}

ScopedTmpdir::~ScopedTmpdir() {
    if (had_old_)
        ::setenv("TMPDIR", old_.c_str(), 1);
    else
        ::unsetenv("TMPDIR");
}

}  // namespace ctm
