// Samples in the formats papers' evaluators read (ctm_sample --format npz | png), as
// core/export/sample_files.py writes them for [sample] formats:
//
// * npz: a ZIP of stored (uncompressed) members, as numpy.savez writes it: arr_0.npy, uint8
//   [N, H, W, C] converted as ADM / CTM convert, ((x + 1) * 127.5).clamp(0, 255) truncated to
//   uint8; arr_1.npy, int64 [N] labels for class-conditional models. ZIP64 records where a
//   member or an offset passes 4 GiB - 1.
// * png: a folder of one 8-bit PNG per sample in EDM generate.py's layout
//   (<folder>/000000/000000.png, one sub-folder per 1,000), converted as EDM converts,
//   (x * 127.5 + 128).clip(0, 255) truncated to uint8; built beside its final name and renamed
//   into place. The folder holds the marker file .ctmkit-samples (ctmkit's sample stage writes
//   the same): an existing --out folder is replaced only when it holds the marker.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "output.hpp"

namespace ctm {

inline constexpr const char* kPngMarker = ".ctmkit-samples";
inline constexpr std::int64_t kPngShard = 1000;

// One value of a [-1, 1] sample as ADM / CTM (npz) and EDM (png) convert it, in float32.
std::uint8_t adm_uint8(float x);
std::uint8_t edm_uint8(float x);

// The pixels (interleaved H x W x C) of one [C, H, W] float sample, converted by `convert`.
std::vector<std::uint8_t> hwc_pixels(const float* sample, int channels, int height, int width,
                                     std::uint8_t (*convert)(float));

// A ZIP archive of stored members written in one pass into `file`: each member's size is
// declared when it begins, its CRC-32 computed as its bytes arrive and patched into its local
// header when it ends. `force_zip64` writes ZIP64 records even where not needed (tests).
class StoredZip {
public:
    explicit StoredZip(AtomicFile& file, bool force_zip64 = false)
        : file_(file), force_zip64_(force_zip64) {}
    void begin(const std::string& name, std::uint64_t size);
    void write(const void* data, std::size_t size);
    void end();
    void finish();   // the central directory and the end records

private:
    struct Member {
        std::string name;
        std::uint64_t size = 0, offset = 0;
        std::uint32_t crc = 0;
        bool zip64 = false;
    };
    void put(const std::vector<std::uint8_t>& bytes);
    AtomicFile& file_;
    bool force_zip64_;
    std::vector<Member> members_;
    std::uint64_t pos_ = 0, written_ = 0;
    bool open_ = false;
};

// The npz of ctm_sample --format npz: arr_0 streams in sample by sample (add), arr_1 (the
// labels, when `with_labels`) is written at commit().
class NpzWriter {
public:
    NpzWriter(const std::string& path, std::int64_t num, int channels, int height, int width,
              bool with_labels, bool force_zip64 = false);
    void add(const float* sample);
    void commit(const std::vector<std::int64_t>& labels);

private:
    AtomicFile file_;
    StoredZip zip_;
    std::int64_t num_, done_ = 0;
    int channels_, height_, width_;
    bool with_labels_;
};

// Throws UserError unless `out` may become ctm_sample's PNG folder: its parent exists and is
// writable, and `out` is missing or a real folder (no symbolic link) holding kPngMarker, and
// the model file does not lie inside it.
void check_png_folder(const std::string& out, const std::string& model);

// The folder of ctm_sample --format png: PNGs go into ".<name>.ctm_sample-<pid>.tmp" beside
// `out` (a killed run's leftover is removed by the next run into the same --out), renamed onto
// `out` by commit(); the destructor removes an uncommitted one.
class PngFolderWriter {
public:
    PngFolderWriter(std::string out, int channels, int height, int width);
    ~PngFolderWriter();
    PngFolderWriter(const PngFolderWriter&) = delete;
    PngFolderWriter& operator=(const PngFolderWriter&) = delete;
    void add(const float* sample);
    void commit();

private:
    std::string out_, tmp_;
    int channels_, height_, width_;
    std::int64_t done_ = 0;
    bool committed_ = false;
};

// EDM generate.py's name for image i: "{i - i % 1000:06d}/{i:06d}.png".
std::string png_relpath(std::int64_t i);

}  // namespace ctm
