# The CUDA kernel sources built for ROCm through cuda/compat.h, with the same
# torch op binding (ROCm builds of torch present HIP devices as "cuda").
# CMake's HIP language needs cmake >= 3.21 with a ROCm install, >= 3.31 with
# Debian's packages (see scripts/check_hip.sh for the settings).
if(TOKENMILL_HIP)
  cmake_minimum_required(VERSION 3.21)
  if(NOT DEFINED CMAKE_HIP_ARCHITECTURES)
    set(CMAKE_HIP_ARCHITECTURES gfx90a gfx942)
  endif()
  enable_language(HIP)
  set_source_files_properties(${TOKENMILL_GPU_SOURCES} PROPERTIES LANGUAGE HIP)
  add_library(tokenmill_hip STATIC ${TOKENMILL_GPU_SOURCES})
  set_target_properties(tokenmill_hip PROPERTIES HIP_STANDARD 17 POSITION_INDEPENDENT_CODE ON)
  target_include_directories(tokenmill_hip PUBLIC ${CMAKE_CURRENT_SOURCE_DIR}/cuda
                                                  ${CMAKE_CURRENT_SOURCE_DIR}/cpp/include)
  message(STATUS "tokenmill: HIP kernels for ${CMAKE_HIP_ARCHITECTURES}")
endif()
