// Whole-file digests of exported jumpers (core/base/integrity.py): the bytes of a jumper are read
// once, checked, and only then used (TorchScript: parsed from memory; .pt2: copied into a
// private temporary folder and loaded from there).
#pragma once

#include <string>

namespace ctm {

// The bytes of the regular file `path` ("jumper file not found" / "not a regular file" /
// "cannot read" as one-line UserErrors).
std::string read_jumper_file(const std::string& path);

// "<path>.sha256": the sidecar holding a .pt2 package's SHA-256 (sha256sum format).
std::string sidecar_path(const std::string& path);

// Throws UserError unless the sidecar of `path` exists and names the SHA-256 of `data` (the
// bytes read from `path`); "re-export" when there is none.
void check_sidecar(const std::string& path, const std::string& data);

// The record holding a TorchScript archive's digest (relative to its top folder), and the
// version-1 digest itself: SHA-256 over "name\n<size>\n<bytes>" of every other record, in
// byte order of the names. Checked by load_torchscript_jumper (jumper_torchscript.cpp).
inline constexpr const char* kArchiveDigestRecord = "extra/archive_sha256";
// The most uncompressed bytes an archive may claim per byte of file (a zip bomb is refused
// before anything is inflated).
inline constexpr unsigned long long kMaxExpansion = 64;

// A folder made by mkdtemp under $TMPDIR (or /tmp), removed with its content on destruction.
class TempDir {
public:
    explicit TempDir(const std::string& prefix);
    ~TempDir();
    TempDir(const TempDir&) = delete;
    TempDir& operator=(const TempDir&) = delete;
    const std::string& path() const { return path_; }

private:
    std::string path_;
};

// Sets TMPDIR to `folder` while it lives (AOTInductor extracts packages into
// $TMPDIR/aotinductor_* and leaves that folder behind when a load fails).
class ScopedTmpdir {
public:
    explicit ScopedTmpdir(const std::string& folder);
    ~ScopedTmpdir();
    ScopedTmpdir(const ScopedTmpdir&) = delete;
    ScopedTmpdir& operator=(const ScopedTmpdir&) = delete;

private:
    bool had_old_ = false;
    std::string old_;
};

}  // namespace ctm
