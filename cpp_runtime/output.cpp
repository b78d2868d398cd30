#include "output.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <bit>
#include <cerrno>
#include <cmath>
#include <csignal>
#include <cstring>
#include <filesystem>

#include "errors.hpp"

#ifdef CTM_HAVE_ZLIB
#include <zlib.h>
#endif

static_assert(std::endian::native == std::endian::little,
              "the .npy writer assumes a little-endian host");

namespace ctm {

namespace fs = std::filesystem;

// --- temporary-file registry for signal cleanup --------------------------------------------

namespace {

constexpr int kSlots = 8;
constexpr std::size_t kPathMax = 4096;
char g_tmp_paths[kSlots][kPathMax];          // "" = free slot
volatile std::sig_atomic_t g_tmp_used[kSlots];

int register_tmp(const std::string& path) {
    if (path.size() >= kPathMax) return -1;
    for (int i = 0; i < kSlots; ++i) {
        if (!g_tmp_used[i]) {
            std::memcpy(g_tmp_paths[i], path.c_str(), path.size() + 1);
            g_tmp_used[i] = 1;
            return i;
        }
    }
    return -1;
}

void unregister_tmp(int slot) {
    if (slot >= 0) g_tmp_used[slot] = 0;
}

extern "C" void cleanup_and_die(int sig) {
    for (int i = 0; i < kSlots; ++i)
        if (g_tmp_used[i]) ::unlink(g_tmp_paths[i]);   // async-signal-safe
    std::signal(sig, SIG_DFL);
    std::raise(sig);
}

std::string errno_text() { return std::strerror(errno); }

}  // namespace

void install_cleanup_handlers() {
    for (int sig : {SIGINT, SIGTERM, SIGHUP}) std::signal(sig, cleanup_and_die);
}

// --- AtomicFile ----------------------------------------------------------------------------

AtomicFile::AtomicFile(std::string target) : target_(std::move(target)) {
    fs::path p(target_);
    fs::path dir = p.parent_path().empty() ? fs::path(".") : p.parent_path();
    std::string name = ".";
    name += p.filename().string();
    name += ".XXXXXX.tmp";
    std::string tmpl = (dir / name).string();
    fd_ = ::mkstemps(tmpl.data(), 4);
    if (fd_ < 0) throw UserError(target_ + ": cannot create a file there (" + errno_text() + ")");
    tmp_ = tmpl;
    slot_ = register_tmp(tmp_);
}

AtomicFile::~AtomicFile() {
    if (fd_ >= 0) ::close(fd_);
    if (!committed_ && !tmp_.empty()) ::unlink(tmp_.c_str());
    unregister_tmp(slot_);
}

void AtomicFile::write(const void* data, std::size_t size) {
    const char* p = static_cast<const char*>(data);
    while (size > 0) {
        ssize_t n = ::write(fd_, p, size);
        if (n < 0) {
            if (errno == EINTR) continue;
            throw UserError(target_ + ": write failed (" + errno_text() + ")");
        }
        p += n;
        size -= static_cast<std::size_t>(n);
    }
}

void AtomicFile::write_at(std::uint64_t offset, const void* data, std::size_t size) {
    const char* p = static_cast<const char*>(data);
    while (size > 0) {
        ssize_t n = ::pwrite(fd_, p, size, static_cast<off_t>(offset));
        if (n < 0) {
            if (errno == EINTR) continue;
            throw UserError(target_ + ": write failed (" + errno_text() + ")");
        }
        p += n;
        offset += static_cast<std::uint64_t>(n);
        size -= static_cast<std::size_t>(n);
    }
}

void AtomicFile::commit() {
    // mkstemps creates 0600; give the result the usual permissions (0666 & ~umask).
    mode_t mask = ::umask(0);
    ::umask(mask);
    ::fchmod(fd_, 0666 & ~mask);
    if (::fsync(fd_) != 0) throw UserError(target_ + ": fsync failed (" + errno_text() + ")");
    int fd = fd_;
    fd_ = -1;
    if (::close(fd) != 0) throw UserError(target_ + ": close failed (" + errno_text() + ")");
    if (::rename(tmp_.c_str(), target_.c_str()) != 0)
        throw UserError(target_ + ": cannot rename the finished file into place (" +
                        errno_text() + ")");
    committed_ = true;
    unregister_tmp(slot_);
    slot_ = -1;
    fs::path dir = fs::path(target_).parent_path();
    int dfd = ::open(dir.empty() ? "." : dir.c_str(), O_RDONLY | O_DIRECTORY);
    if (dfd >= 0) {   // make the rename durable; best effort
        ::fsync(dfd);
        ::close(dfd);
    }
}

namespace {

const char* file_kind(mode_t mode) {
    if (S_ISDIR(mode)) return "a directory";
    if (S_ISLNK(mode)) return "a symbolic link";
    if (S_ISCHR(mode)) return "a character device";
    if (S_ISBLK(mode)) return "a block device";
    if (S_ISFIFO(mode)) return "a FIFO";
    if (S_ISSOCK(mode)) return "a socket";
    return "not a regular file";
}

}  // namespace

void check_output_path(const std::string& path) {
    if (path.empty()) throw UserError("--out: empty path");
    fs::path p(path);
    fs::path dir = p.parent_path().empty() ? fs::path(".") : p.parent_path();
    std::error_code ec;
    if (!fs::is_directory(dir, ec))
        throw UserError(path + ": directory " + dir.string() + " does not exist");
    if (::access(dir.c_str(), W_OK | X_OK) != 0)
        throw UserError(path + ": directory " + dir.string() + " is not writable");
    struct stat st {};
    if (::lstat(path.c_str(), &st) == 0 && !S_ISREG(st.st_mode))
        throw UserError(path + ": is " + file_kind(st.st_mode) + ", not a regular file "
                        "(ctm_sample replaces regular files only)");
}

void check_not_input(const std::string& out, const std::string& model,
                     const std::string& flag) {
    std::error_code ec;
    for (const std::string& input : {model, model + ".sha256"})
        if (fs::equivalent(out, input, ec) ||
            fs::weakly_canonical(out, ec) == fs::weakly_canonical(input, ec))
            throw UserError(flag + " " + out + " is " +
                            (input == model ? "the model file" : "the model's digest file") +
                            " (--model " + model + ")");
}

std::string sibling_path(const std::string& out, std::string_view suffix) {
    fs::path p(out);
    std::string name = p.filename().string();
    if (name.size() > 4 && name.compare(name.size() - 4, 4, ".npy") == 0)
        name.resize(name.size() - 4);
    return (p.parent_path() / (name + std::string(suffix))).string();
}

// --- NPY -----------------------------------------------------------------------------------

std::string npy_header(std::string_view descr, const std::vector<std::int64_t>& shape) {
    std::string dict = "{'descr': '" + std::string(descr) + "', 'fortran_order': False, "
                       "'shape': (";
    for (std::size_t i = 0; i < shape.size(); ++i)
        dict += std::to_string(shape[i]) + (i + 1 < shape.size() ? ", " : "");
    if (shape.size() == 1) dict += ",";
    dict += "), }";
    // magic (6) + version (2) + header length (2) + dict + spaces + '\n' = multiple of 64
    std::size_t total = 10 + dict.size() + 1;
    dict.append((64 - total % 64) % 64, ' ');
    dict += '\n';
    if (dict.size() > 65535) throw UserError("npy header too long");
    std::string out("\x93NUMPY\x01\x00", 8);
    out += char(dict.size() & 0xFF);
    out += char(dict.size() >> 8);
    return out + dict;
}

// --- PNG -----------------------------------------------------------------------------------

std::uint32_t crc32(const std::uint8_t* data, std::size_t size, std::uint32_t crc) {
    static const auto table = [] {
        std::array<std::uint32_t, 256> t{};
        for (std::uint32_t n = 0; n < 256; ++n) {
            std::uint32_t c = n;
            for (int k = 0; k < 8; ++k) c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
            t[n] = c;
        }
        return t;
    }();
    crc = ~crc;
    for (std::size_t i = 0; i < size; ++i) crc = table[(crc ^ data[i]) & 0xFF] ^ (crc >> 8);
    return ~crc;
}

std::vector<std::uint8_t> zlib_stream(const std::vector<std::uint8_t>& data) {
#ifdef CTM_HAVE_ZLIB
    uLongf size = compressBound(static_cast<uLong>(data.size()));
    std::vector<std::uint8_t> out(size);
    if (compress2(out.data(), &size, data.data(), static_cast<uLong>(data.size()), 6) != Z_OK)
        throw std::runtime_error("zlib compress2 failed");
    out.resize(size);
    return out;
#else
    std::vector<std::uint8_t> out = {0x78, 0x01};   // deflate, 32K window, no dictionary
    std::size_t pos = 0;
    do {
        std::size_t n = std::min<std::size_t>(65535, data.size() - pos);
        bool last = pos + n == data.size();
        out.push_back(last ? 1 : 0);   // BFINAL, BTYPE = 00 (stored)
        out.push_back(std::uint8_t(n & 0xFF));
        out.push_back(std::uint8_t(n >> 8));
        out.push_back(std::uint8_t(~n & 0xFF));
        out.push_back(std::uint8_t((~n >> 8) & 0xFF));
        out.insert(out.end(), data.begin() + pos, data.begin() + pos + n);
        pos += n;
    } while (pos < data.size());
    std::uint32_t a = 1, b = 0;   // Adler-32
    for (std::uint8_t c : data) {
        a = (a + c) % 65521;
        b = (b + a) % 65521;
    }
    std::uint32_t adler = (b << 16) | a;
    for (int shift = 24; shift >= 0; shift -= 8) out.push_back(std::uint8_t(adler >> shift));
    return out;
#endif
}

namespace {

void put_u32(std::vector<std::uint8_t>& out, std::uint32_t v) {
    for (int shift = 24; shift >= 0; shift -= 8) out.push_back(std::uint8_t(v >> shift));
}

void put_chunk(std::vector<std::uint8_t>& out, const char* type,
               const std::vector<std::uint8_t>& body) {
    put_u32(out, static_cast<std::uint32_t>(body.size()));
    std::size_t start = out.size();
    out.insert(out.end(), type, type + 4);
    out.insert(out.end(), body.begin(), body.end());
    put_u32(out, crc32(out.data() + start, out.size() - start));
}

}  // namespace

std::vector<std::uint8_t> encode_png(const std::vector<std::uint8_t>& pixels, int width,
                                     int height, int channels) {
    if (width <= 0 || height <= 0 || (channels != 1 && channels != 3) ||
        pixels.size() != std::size_t(width) * height * channels)
        throw std::invalid_argument("encode_png: bad image dimensions");
    std::vector<std::uint8_t> out = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1A, '\n'};
    std::vector<std::uint8_t> ihdr;
    put_u32(ihdr, std::uint32_t(width));
    put_u32(ihdr, std::uint32_t(height));
    ihdr.push_back(8);                        // bit depth
    ihdr.push_back(channels == 1 ? 0 : 2);    // grey / truecolour
    ihdr.push_back(0);                        // deflate
    ihdr.push_back(0);                        // adaptive filtering
    ihdr.push_back(0);                        // no interlace
    put_chunk(out, "IHDR", ihdr);
    std::size_t row = std::size_t(width) * channels;
    std::vector<std::uint8_t> raw;
    raw.reserve((row + 1) * height);
    for (int y = 0; y < height; ++y) {
        raw.push_back(0);                     // filter type None
        raw.insert(raw.end(), pixels.begin() + y * row, pixels.begin() + (y + 1) * row);
    }
    put_chunk(out, "IDAT", zlib_stream(raw));
    put_chunk(out, "IEND", {});
    return out;
}

Image image_grid(const float* samples, std::int64_t count, int channels, int height, int width,
                 std::int64_t max_images, int pad) {
    std::int64_t n = std::min(count, max_images);
    if (n <= 0) throw std::invalid_argument("image_grid: no images");
    int cols = static_cast<int>(std::ceil(std::sqrt(static_cast<double>(n))));
    while (std::int64_t(cols - 1) * (cols - 1) >= n) --cols;   // guard sqrt rounding
    while (std::int64_t(cols) * cols < n) ++cols;
    int rows = static_cast<int>((n + cols - 1) / cols);
    Image img;
    img.channels = channels;
    img.width = cols * (width + pad) + pad;
    img.height = rows * (height + pad) + pad;
    img.pixels.assign(std::size_t(img.width) * img.height * channels, 0);
    const std::int64_t plane = std::int64_t(height) * width;
    for (std::int64_t k = 0; k < n; ++k) {
        int gx = pad + int(k % cols) * (width + pad);
        int gy = pad + int(k / cols) * (height + pad);
        const float* src = samples + k * channels * plane;
        for (int y = 0; y < height; ++y)
            for (int x = 0; x < width; ++x)
                for (int c = 0; c < channels; ++c) {
                    float v = src[c * plane + std::int64_t(y) * width + x];
                    double q = std::isfinite(v) ? std::round((double(v) + 1.0) * 127.5) : 0.0;
                    q = std::clamp(q, 0.0, 255.0);
                    img.pixels[(std::size_t(gy + y) * img.width + gx + x) * channels + c] =
                        static_cast<std::uint8_t>(q);
                }
    }
    return img;
}

}  // namespace ctm
