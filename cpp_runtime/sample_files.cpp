#include "sample_files.hpp"

#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <regex>
#include <sstream>
#include <system_error>

#include "errors.hpp"

namespace ctm {

namespace fs = std::filesystem;

std::uint8_t adm_uint8(float x) {
    // core/export/sample_files.py adm_uint8: ((x + 1) * 127.5).clamp(0, 255).to(uint8), in float32
    float v = (x + 1.0f) * 127.5f;
    v = std::clamp(v, 0.0f, 255.0f);
    return static_cast<std::uint8_t>(v);   // truncates toward zero, as the cast does
}

std::uint8_t edm_uint8(float x) {
    // core/export/sample_files.py edm_uint8: (x * 127.5 + 128).clip(0, 255).to(uint8), in float32
    float v = x * 127.5f;
    v = v + 128.0f;
    v = std::clamp(v, 0.0f, 255.0f);
    return static_cast<std::uint8_t>(v);
}

std::vector<std::uint8_t> hwc_pixels(const float* sample, int channels, int height, int width,
                                     std::uint8_t (*convert)(float)) {
    const std::size_t plane = std::size_t(height) * width;
    std::vector<std::uint8_t> out(plane * channels);
    for (int c = 0; c < channels; ++c)
        for (std::size_t p = 0; p < plane; ++p)
            out[p * channels + c] = convert(sample[c * plane + p]);
    return out;
}

// --- ZIP (stored members) --------------------------------------------------------------------

namespace {

constexpr std::uint32_t kMax32 = 0xFFFFFFFFu;
constexpr std::uint16_t kDosDate = (0 << 9) | (1 << 5) | 1;   // 1980-01-01, time 00:00:00

void le(std::vector<std::uint8_t>& out, std::uint64_t v, int bytes) {
    for (int i = 0; i < bytes; ++i) out.push_back(std::uint8_t(v >> (8 * i)));
}

}  // namespace

void StoredZip::put(const std::vector<std::uint8_t>& bytes) {
    file_.write(bytes.data(), bytes.size());
    pos_ += bytes.size();
}

void StoredZip::begin(const std::string& name, std::uint64_t size) {
    if (open_) throw std::logic_error("StoredZip: a member is open");
    Member m{name, size, pos_, 0, force_zip64_ || size >= kMax32};
    std::vector<std::uint8_t> h;
    le(h, 0x04034b50, 4);                     // local file header
    le(h, m.zip64 ? 45 : 20, 2);              // version needed
    le(h, 0, 2);                              // flags
    le(h, 0, 2);                              // stored
    le(h, 0, 2);                              // time
    le(h, kDosDate, 2);
    le(h, 0, 4);                              // CRC-32: patched by end()
    le(h, m.zip64 ? kMax32 : size, 4);        // compressed size
    le(h, m.zip64 ? kMax32 : size, 4);        // uncompressed size
    le(h, name.size(), 2);
    le(h, m.zip64 ? 20 : 0, 2);               // extra field length
    h.insert(h.end(), name.begin(), name.end());
    if (m.zip64) {                            // ZIP64 extended information
        le(h, 0x0001, 2);
        le(h, 16, 2);
        le(h, size, 8);
        le(h, size, 8);
    }
    put(h);
    members_.push_back(m);
    written_ = 0;
    open_ = true;
}

void StoredZip::write(const void* data, std::size_t size) {
    Member& m = members_.back();
    m.crc = crc32(static_cast<const std::uint8_t*>(data), size, m.crc);
    file_.write(data, size);
    pos_ += size;
    written_ += size;
}

void StoredZip::end() {
    Member& m = members_.back();
    if (!open_ || written_ != m.size)
        throw std::logic_error("StoredZip: member " + m.name + " holds " +
                               std::to_string(written_) + " bytes, declared " +
                               std::to_string(m.size));
    std::vector<std::uint8_t> crc;
    le(crc, m.crc, 4);
    file_.write_at(m.offset + 14, crc.data(), crc.size());
    open_ = false;
}

void StoredZip::finish() {
    if (open_) throw std::logic_error("StoredZip: a member is open");
    const std::uint64_t cd_offset = pos_;
    bool zip64 = force_zip64_;
    std::vector<std::uint8_t> cd;
    for (const Member& m : members_) {
        const bool big_offset = force_zip64_ || m.offset >= kMax32;
        std::vector<std::uint8_t> extra;
        if (m.zip64) {
            le(extra, m.size, 8);
            le(extra, m.size, 8);
        }
        if (big_offset) le(extra, m.offset, 8);
        if (!extra.empty()) {
            std::vector<std::uint8_t> head;
            le(head, 0x0001, 2);
            le(head, extra.size(), 2);
            extra.insert(extra.begin(), head.begin(), head.end());
        }
        zip64 = zip64 || m.zip64 || big_offset;
        const int version = (m.zip64 || big_offset) ? 45 : 20;
        le(cd, 0x02014b50, 4);                // central directory header
        le(cd, version, 2);                   // made by (MS-DOS attributes)
        le(cd, version, 2);                   // needed
        le(cd, 0, 2);
        le(cd, 0, 2);
        le(cd, 0, 2);
        le(cd, kDosDate, 2);
        le(cd, m.crc, 4);
        le(cd, m.zip64 ? kMax32 : m.size, 4);
        le(cd, m.zip64 ? kMax32 : m.size, 4);
        le(cd, m.name.size(), 2);
        le(cd, extra.size(), 2);
        le(cd, 0, 2);                         // comment
        le(cd, 0, 2);                         // disk
        le(cd, 0, 2);                         // internal attributes
        le(cd, 0, 4);                         // external attributes
        le(cd, big_offset ? kMax32 : m.offset, 4);
        cd.insert(cd.end(), m.name.begin(), m.name.end());
        cd.insert(cd.end(), extra.begin(), extra.end());
    }
    put(cd);
    const std::uint64_t cd_size = cd.size(), n = members_.size();
    zip64 = zip64 || cd_offset >= kMax32;
    std::vector<std::uint8_t> tail;
    if (zip64) {
        const std::uint64_t record = pos_;
        le(tail, 0x06064b50, 4);              // ZIP64 end of central directory record
        le(tail, 44, 8);
        le(tail, 45, 2);
        le(tail, 45, 2);
        le(tail, 0, 4);
        le(tail, 0, 4);
        le(tail, n, 8);
        le(tail, n, 8);
        le(tail, cd_size, 8);
        le(tail, cd_offset, 8);
        le(tail, 0x07064b50, 4);              // its locator
        le(tail, 0, 4);
        le(tail, record, 8);
        le(tail, 1, 4);
    }
    le(tail, 0x06054b50, 4);                  // end of central directory
    le(tail, 0, 2);
    le(tail, 0, 2);
    le(tail, zip64 ? 0xFFFF : n, 2);
    le(tail, zip64 ? 0xFFFF : n, 2);
    le(tail, zip64 ? kMax32 : cd_size, 4);
    le(tail, zip64 ? kMax32 : cd_offset, 4);
    le(tail, 0, 2);
    put(tail);
}

// --- npz -------------------------------------------------------------------------------------

NpzWriter::NpzWriter(const std::string& path, std::int64_t num, int channels, int height,
                     int width, bool with_labels, bool force_zip64)
    : file_(path), zip_(file_, force_zip64), num_(num), channels_(channels), height_(height),
      width_(width), with_labels_(with_labels) {
    std::string header = npy_header("|u1", {num, height, width, channels});
    zip_.begin("arr_0.npy", header.size() + std::uint64_t(num) * height * width * channels);
    zip_.write(header.data(), header.size());
}

void NpzWriter::add(const float* sample) {
    auto px = hwc_pixels(sample, channels_, height_, width_, adm_uint8);
    zip_.write(px.data(), px.size());
    ++done_;
}

void NpzWriter::commit(const std::vector<std::int64_t>& labels) {
    if (done_ != num_) throw std::logic_error("NpzWriter: not every sample was added");
    zip_.end();
    if (with_labels_) {
        std::string header = npy_header("<i8", {std::int64_t(labels.size())});
        zip_.begin("arr_1.npy", header.size() + labels.size() * sizeof(std::int64_t));
        zip_.write(header.data(), header.size());
        zip_.write(labels.data(), labels.size() * sizeof(std::int64_t));
        zip_.end();
    }
    zip_.finish();
    file_.commit();
}

// --- PNG folder ------------------------------------------------------------------------------

std::string png_relpath(std::int64_t i) {
    char buf[64];
    std::snprintf(buf, sizeof buf, "%06lld/%06lld.png", (long long)(i - i % kPngShard),
                  (long long)i);
    return buf;
}

namespace {

// The start time of process `pid` (/proc/PID/stat field 22, clock ticks since boot): -1 when
// there is no such process, 0 where /proc is missing (as core/base/io.py's _start_time).
long long start_time(long long pid) {
    std::ifstream in("/proc/" + std::to_string(pid) + "/stat");
    if (!in) {
        if (!fs::exists("/proc/self/stat")) return ::kill(pid_t(pid), 0) == 0 || errno != ESRCH
                                                       ? 0 : -1;
        return -1;
    }
    std::string stat((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    std::istringstream rest(stat.substr(stat.rfind(')') + 1));
    std::string field;
    for (int k = 0; k < 20 && rest >> field; ++k) {
    }
    return std::atoll(field.c_str());
}

std::string errno_text() { return std::strerror(errno); }

fs::path parent_of(const std::string& out) {
    fs::path p = fs::path(out).parent_path();
    return p.empty() ? fs::path(".") : p;
}

// ".<name>.ctmkit-<pid>-<start>-<random>.tmp" (core/base/io.py's temporaries): a leftover of a
// dead writer is swept by ctm_sample and by ctmkit's sample stage alike.
const std::regex& tmp_pattern() {
    static const std::regex re(R"(\.(.+)\.ctmkit-([0-9]+)-([0-9]+)-[A-Za-z0-9_]+\.tmp)");
    return re;
}

void sweep_stale(const fs::path& dir, const std::string& name) {
    std::error_code ec;
    for (const auto& e : fs::directory_iterator(dir, ec)) {
        std::smatch m;
        const std::string n = e.path().filename().string();
        if (!std::regex_match(n, m, tmp_pattern()) || m[1] != name ||
            !e.is_directory(ec) || e.is_symlink(ec))
            continue;
        long long started = start_time(std::atoll(m[2].str().c_str()));
        long long recorded = std::atoll(m[3].str().c_str());
        if (started == -1 || (started != 0 && recorded != 0 && started != recorded))
            fs::remove_all(e.path(), ec);
    }
}

void write_file(const fs::path& path, const std::vector<std::uint8_t>& bytes) {
    int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
    if (fd < 0) throw UserError(path.string() + ": cannot create (" + errno_text() + ")");
    const std::uint8_t* p = bytes.data();
    std::size_t left = bytes.size();
    while (left > 0) {
        ssize_t n = ::write(fd, p, left);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) {
            std::string why = errno_text();
            ::close(fd);
            throw UserError(path.string() + ": write failed (" + why + ")");
        }
        p += n;
        left -= std::size_t(n);
    }
    if (::close(fd) != 0) throw UserError(path.string() + ": close failed (" + errno_text() + ")");
}

}  // namespace

void check_png_folder(const std::string& out, const std::string& model) {
    if (out.empty()) throw UserError("--out: empty path");
    fs::path dir = parent_of(out);
    std::error_code ec;
    if (!fs::is_directory(dir, ec))
        throw UserError(out + ": directory " + dir.string() + " does not exist");
    if (::access(dir.c_str(), W_OK | X_OK) != 0)
        throw UserError(out + ": directory " + dir.string() + " is not writable");
    struct stat st {};
    if (::lstat(out.c_str(), &st) == 0) {
        if (!S_ISDIR(st.st_mode))
            throw UserError(out + ": exists and is not a folder (--format png writes a folder "
                            "of PNGs there)");
        if (!fs::is_regular_file(fs::path(out) / kPngMarker, ec))
            throw UserError(out + ": exists and was not written by ctm_sample or ctmkit (no " +
                            std::string(kPngMarker) + " inside); --format png replaces only "
                            "its own folders: move it away or name a new one");
        fs::path real_out = fs::weakly_canonical(out, ec);
        for (const std::string& input : {model, model + ".sha256"}) {
            fs::path real = fs::weakly_canonical(input, ec);
            auto [a, b] = std::mismatch(real_out.begin(), real_out.end(), real.begin(),
                                        real.end());
            if (a == real_out.end())
                throw UserError("--out " + out + " holds " +
                                (input == model ? "the model file" : "the model's digest file") +
                                " (--model " + model + "); it would be replaced");
        }
    }
}

PngFolderWriter::PngFolderWriter(std::string out, int channels, int height, int width)
    : out_(std::move(out)), channels_(channels), height_(height), width_(width) {
    fs::path dir = parent_of(out_);
    const std::string name = fs::path(out_).filename().string();
    sweep_stale(dir, name);
    const long long pid = ::getpid();
    const std::string prefix = "." + name + ".ctmkit-" + std::to_string(pid) + "-" +
                               std::to_string(std::max(0LL, start_time(pid))) + "-";
    std::random_device rd;
    const char* chars = "abcdefghijklmnopqrstuvwxyz0123456789";
    for (int attempt = 0; attempt < 100 && tmp_.empty(); ++attempt) {
        std::string rand;
        for (int k = 0; k < 8; ++k) rand += chars[rd() % 36];
        fs::path p = dir / (prefix + rand + ".tmp");
        if (::mkdir(p.c_str(), 0777) == 0)
            tmp_ = p.string();
        else if (errno != EEXIST)
            throw UserError(out_ + ": cannot create a folder beside it (" + errno_text() + ")");
    }
    if (tmp_.empty()) throw UserError(out_ + ": cannot create a temporary folder beside it");
    write_file(fs::path(tmp_) / kPngMarker, {});
}

PngFolderWriter::~PngFolderWriter() {
    if (!committed_ && !tmp_.empty()) {
        std::error_code ec;
        fs::remove_all(tmp_, ec);
    }
}

void PngFolderWriter::add(const float* sample) {
    auto px = hwc_pixels(sample, channels_, height_, width_, edm_uint8);
    fs::path p = fs::path(tmp_) / png_relpath(done_);
    if (done_ % kPngShard == 0 && ::mkdir(p.parent_path().c_str(), 0777) != 0)
        throw UserError(p.parent_path().string() + ": cannot create (" + errno_text() + ")");
    write_file(p, encode_png(px, width_, height_, channels_));
    ++done_;
}

void PngFolderWriter::commit() {
    std::error_code ec;
    std::string old;
    struct stat st {};
    if (::lstat(out_.c_str(), &st) == 0) {     // ours (check_png_folder): swap it out, then in
        if (!S_ISDIR(st.st_mode) || !fs::is_regular_file(fs::path(out_) / kPngMarker, ec))
            throw UserError(out_ + ": appeared while sampling and is not ctm_sample's folder; "
                            "nothing was replaced");
        old = tmp_.substr(0, tmp_.size() - 4) + "_old.tmp";
        if (::rename(out_.c_str(), old.c_str()) != 0)
            throw UserError(out_ + ": cannot move the old folder aside (" + errno_text() + ")");
    }
    if (::rename(tmp_.c_str(), out_.c_str()) != 0) {
        std::string why = errno_text();
        if (!old.empty()) ::rename(old.c_str(), out_.c_str());
        throw UserError(out_ + ": cannot rename the finished folder into place (" + why + ")");
    }
    committed_ = true;
    if (!old.empty()) fs::remove_all(old, ec);
    int dfd = ::open(parent_of(out_).c_str(), O_RDONLY | O_DIRECTORY);
    if (dfd >= 0) {                            // make the rename durable; best effort
        ::fsync(dfd);
        ::close(dfd);
    }
}

}  // namespace ctm
