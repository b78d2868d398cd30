// Output files: atomic writes (temporary file beside the target, fsync, rename), the NPY v1.0
// header, and a PNG grid of image samples.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace ctm {

// A file written under a temporary name ".<name>.XXXXXX.tmp" in the target's directory and
// renamed onto the target by commit(). Until then the target is untouched; the destructor
// (an exception, an early return) and SIGINT/SIGTERM/SIGHUP (see install_cleanup_handlers)
// remove the temporary file. Errors throw UserError.
class AtomicFile {
public:
    explicit AtomicFile(std::string target);
    ~AtomicFile();
    AtomicFile(const AtomicFile&) = delete;
    AtomicFile& operator=(const AtomicFile&) = delete;

    void write(const void* data, std::size_t size);
    // Overwrites bytes already written at `offset` (e.g. a header's checksum).
    void write_at(std::uint64_t offset, const void* data, std::size_t size);
    void commit();   // fsync, close, rename onto the target, fsync the directory

    const std::string& target() const { return target_; }

private:
    std::string target_;
    std::string tmp_;
    int fd_ = -1;
    int slot_ = -1;   // index in the signal-cleanup registry
    bool committed_ = false;
};

// Removes pending temporary files on SIGINT, SIGTERM and SIGHUP, then dies by the signal.
void install_cleanup_handlers();

// Throws UserError unless `path`'s directory exists and is writable and `path` is either
// missing or a regular file (a directory, symbolic link, device, FIFO or socket is never
// replaced): checked before sampling so that a long run does not fail at the very end.
void check_output_path(const std::string& path);

// Throws UserError when the output `out` (given by `flag`, or derived from it) is the model
// file or its digest sidecar: the same inode (hard or symbolic links) or the same real path.
void check_not_input(const std::string& out, const std::string& model,
                     const std::string& flag = "--out");

// "<dir>/<stem><suffix>" for out = "<dir>/<stem>.npy" (or "<dir>/<name><suffix>" when the name
// has no ".npy" extension).
std::string sibling_path(const std::string& out, std::string_view suffix);

// The NPY format 1.0 header (magic, version, length, dict, padding to a multiple of 64 bytes)
// for a C-order array; descr is a numpy type string such as "<f4" or "<i8".
std::string npy_header(std::string_view descr, const std::vector<std::int64_t>& shape);

// CRC-32 (ISO 3309, as in PNG and zlib), continuing from `crc` (0 to start).
std::uint32_t crc32(const std::uint8_t* data, std::size_t size, std::uint32_t crc = 0);

// A zlib stream (RFC 1950) holding `data`: compressed with zlib when the build found it, else
// stored (uncompressed) deflate blocks.
std::vector<std::uint8_t> zlib_stream(const std::vector<std::uint8_t>& data);

// An 8-bit PNG (colour type 0 for channels == 1, 2 for channels == 3) of interleaved
// row-major pixels.
std::vector<std::uint8_t> encode_png(const std::vector<std::uint8_t>& pixels, int width,
                                     int height, int channels);

// 8-bit image grid of the first min(count, max_images) samples of a [count, C, H, W] float
// array (C in {1, 3}): ceil(sqrt(n)) columns, `pad` black pixels around and between images,
// values mapped from [-1, 1] to 0..255 by round((v + 1) * 127.5), clamped.
struct Image {
    int width = 0, height = 0, channels = 0;
    std::vector<std::uint8_t> pixels;   // interleaved, row-major
};
Image image_grid(const float* samples, std::int64_t count, int channels, int height, int width,
                 std::int64_t max_images = 64, int pad = 2);

}  // namespace ctm
