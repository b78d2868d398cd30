# LibTorch from an installed torch wheel (or an unpacked libtorch), without find_package(Torch).
#
# The CUDA wheel's TorchConfig.cmake insists on a CUDA toolkit (nvcc, CUDA_HOME) even for a
# program that only calls into LibTorch. This module defines the target ctmkit::torch straight
# from the package's include/ and lib/ directories instead, so the same build works with the
# CPU wheel and with the CUDA wheel, with or without a CUDA toolkit installed. With the CUDA
# wheel, libtorch_cuda.so is linked with --no-as-needed so its CUDA backend registers at
# start-up and `--device cuda` works at run time.
#
# Inputs (cache variables, all optional):
#   CTMKIT_TORCH_DIR         the torch package directory (holds include/ and lib/)
#   CTMKIT_PYTHON            a Python with torch installed, asked when CTMKIT_TORCH_DIR is empty
#                            and no CMAKE_PREFIX_PATH entry is torch's share/cmake
#   CTMKIT_TORCH_CXX11_ABI   0 or 1 (torch.compiled_with_cxx11_abi()); detected when empty

set(CTMKIT_TORCH_DIR "" CACHE PATH
    "torch package directory with include/ and lib/ (found through Python when empty)")
set(CTMKIT_PYTHON "" CACHE FILEPATH "Python interpreter used to locate torch")
set(CTMKIT_TORCH_CXX11_ABI "" CACHE STRING
    "_GLIBCXX_USE_CXX11_ABI of the torch libraries: 0, 1, or empty to detect")

set(_ctm_torch_dir "${CTMKIT_TORCH_DIR}")
set(_ctm_abi "${CTMKIT_TORCH_CXX11_ABI}")

# 1. CMAKE_PREFIX_PATH=$(python -c "import torch.utils; print(torch.utils.cmake_prefix_path)")
#    (<torch>/share/cmake) or an unpacked libtorch (<libtorch>).
if(NOT _ctm_torch_dir)
  foreach(_p IN LISTS CMAKE_PREFIX_PATH)
    if(EXISTS "${_p}/Torch/TorchConfig.cmake")
      get_filename_component(_ctm_torch_dir "${_p}/../.." ABSOLUTE)
      break()
    elseif(EXISTS "${_p}/share/cmake/Torch/TorchConfig.cmake")
      get_filename_component(_ctm_torch_dir "${_p}" ABSOLUTE)
      break()
    endif()
  endforeach()
endif()

# 2. Ask Python.
if(NOT _ctm_torch_dir)
  if(NOT CTMKIT_PYTHON)
    find_package(Python3 COMPONENTS Interpreter)
    if(Python3_Interpreter_FOUND)
      set(CTMKIT_PYTHON "${Python3_EXECUTABLE}")
    endif()
  endif()
  if(NOT CTMKIT_PYTHON)
    message(FATAL_ERROR "ctmkit: cannot locate torch: set CTMKIT_TORCH_DIR=<site-packages>/torch "
                        "or CTMKIT_PYTHON=<python with torch>")
  endif()
  execute_process(
    COMMAND "${CTMKIT_PYTHON}" -c
            "import os, torch; print(os.path.dirname(torch.__file__)); print(int(torch.compiled_with_cxx11_abi()))"
    OUTPUT_VARIABLE _ctm_out ERROR_VARIABLE _ctm_err RESULT_VARIABLE _ctm_rc
    OUTPUT_STRIP_TRAILING_WHITESPACE)
  if(NOT _ctm_rc EQUAL 0)
    message(FATAL_ERROR "ctmkit: ${CTMKIT_PYTHON} cannot import torch:\n${_ctm_err}")
  endif()
  string(REPLACE "\n" ";" _ctm_out "${_ctm_out}")
  list(GET _ctm_out 0 _ctm_torch_dir)
  if(_ctm_abi STREQUAL "")
    list(GET _ctm_out 1 _ctm_abi)
  endif()
endif()

set(_ctm_lib "${_ctm_torch_dir}/lib")
foreach(_f include/torch/script.h lib/libtorch.so lib/libtorch_cpu.so lib/libc10.so)
  if(NOT EXISTS "${_ctm_torch_dir}/${_f}")
    message(FATAL_ERROR "ctmkit: ${_ctm_torch_dir} is not a torch package (no ${_f})")
  endif()
endforeach()

# 3. The C++ ABI, when neither given nor asked from Python: libraries built with the new ABI
#    carry the [abi:cxx11] tag (mangled "B5cxx11") in their symbol names.
if(_ctm_abi STREQUAL "")
  file(STRINGS "${_ctm_lib}/libc10.so" _ctm_tagged REGEX "B5cxx11" LIMIT_COUNT 1)
  if(_ctm_tagged)
    set(_ctm_abi 1)
  else()
    set(_ctm_abi 0)
  endif()
endif()
if(NOT _ctm_abi MATCHES "^[01]$")
  message(FATAL_ERROR "ctmkit: CTMKIT_TORCH_CXX11_ABI must be 0 or 1, got '${_ctm_abi}'")
endif()

set(_ctm_libs "${_ctm_lib}/libtorch.so" "${_ctm_lib}/libtorch_cpu.so" "${_ctm_lib}/libc10.so")
set(CTMKIT_TORCH_HAS_CUDA OFF)
if(EXISTS "${_ctm_lib}/libtorch_cuda.so")
  list(APPEND _ctm_libs "${_ctm_lib}/libtorch_cuda.so")
  set(CTMKIT_TORCH_HAS_CUDA ON)
endif()

find_package(Threads REQUIRED)
add_library(ctmkit_torch INTERFACE)
add_library(ctmkit::torch ALIAS ctmkit_torch)
target_include_directories(ctmkit_torch SYSTEM INTERFACE
  "${_ctm_torch_dir}/include" "${_ctm_torch_dir}/include/torch/csrc/api/include")
target_compile_definitions(ctmkit_torch INTERFACE _GLIBCXX_USE_CXX11_ABI=${_ctm_abi})
# --no-as-needed: keep libtorch_cuda.so (whose static initialisers register the CUDA backend)
# although no symbol of it is referenced directly.
target_link_options(ctmkit_torch INTERFACE "LINKER:--no-as-needed")
target_link_libraries(ctmkit_torch INTERFACE ${_ctm_libs} Threads::Threads ${CMAKE_DL_LIBS})

set(CTMKIT_TORCH_LIBDIR "${_ctm_lib}")
set(CTMKIT_TORCH_ABI "${_ctm_abi}")
message(STATUS "ctmkit: LibTorch from ${_ctm_torch_dir} (CUDA backend: ${CTMKIT_TORCH_HAS_CUDA}, "
               "_GLIBCXX_USE_CXX11_ABI=${_ctm_abi})")
