# The CUDA kernel sources built for ROCm through cuda/compat.h. CMake's HIP
# language needs cmake >= 3.31 (pip install cmake).
if(TOKENMILL_HIP)
  cmake_minimum_required(VERSION 3.31)
  if(NOT DEFINED CMAKE_HIP_ARCHITECTURES)
    set(CMAKE_HIP_ARCHITECTURES gfx90a gfx942)
  endif()
  enable_language(HIP)
  set_source_files_properties(cuda/cache_kernels.cu PROPERTIES LANGUAGE HIP)
  add_library(tokenmill_hip STATIC cuda/cache_kernels.cu)
  target_include_directories(tokenmill_hip PUBLIC ${CMAKE_CURRENT_SOURCE_DIR}/cuda)
  message(STATUS "tokenmill: HIP kernels for ${CMAKE_HIP_ARCHITECTURES}")
endif()
