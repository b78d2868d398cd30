#include "jumper.hpp"

#include <filesystem>
#include <vector>

#include "errors.hpp"

namespace ctm {

namespace {

bool has_extension(const std::string& path, const char* ext) {
    return std::filesystem::path(path).extension() == ext;
}

}  // namespace

LoadedJumper load_jumper(const std::string& path, const c10::Device& device) {
    std::error_code ec;
    if (!std::filesystem::exists(path, ec))
        throw UserError(path + ": jumper file not found");
    if (!std::filesystem::is_regular_file(path, ec))
        throw UserError(path + ": not a regular file");
    // Backends by file extension: .pt2 is an AOTInductor package (core/export/aoti.py: export_aoti);
    // everything else is read as a TorchScript archive (torch.jit.save writes any name,
    // conventionally .pt).
    if (has_extension(path, ".pt2")) return load_aoti_jumper(path, device);
    return load_torchscript_jumper(path, device);
}

std::string summarize_error(const std::string& message) {
    std::vector<std::string> lines;
    std::size_t start = 0;
    while (start <= message.size()) {
        std::size_t end = message.find('\n', start);
        if (end == std::string::npos) end = message.size();
        std::string line = message.substr(start, end - start);
        auto b = line.find_first_not_of(" \t\r");
        auto e = line.find_last_not_of(" \t\r");
        if (b != std::string::npos) lines.push_back(line.substr(b, e - b + 1));
        start = end + 1;
    }
    if (lines.empty()) return "unknown error";
    // TorchScript interpreter errors put the TorchScript traceback first and the original
    // exception ("RuntimeError: ...") last.
    std::string line = lines.front().rfind("The following operation failed in the "
                                           "TorchScript interpreter", 0) == 0
                           ? lines.back()
                           : lines.front();
    if (line.size() > 300) line = line.substr(0, 297) + "...";
    return line;
}

}  // namespace ctm
