# CUDA kernels: TOKENMILL_CUDA=AUTO builds them whenever nvcc is found. The
# same sources build for ROCm (hip/hip.cmake).
set(TOKENMILL_GPU_SOURCES
    cuda/cache_kernels.cu cuda/attention_kernels.cu cuda/prefill_attention_kernels.cu
    cuda/norm_kernels.cu cuda/rotary_kernels.cu cuda/activation_kernels.cu cuda/int4_kernels.cu
    cuda/moe_kernels.cu cuda/gguf_kernels.cu)

set(_tm_cuda OFF)
if(TOKENMILL_CUDA STREQUAL "AUTO")
  include(CheckLanguage)
  check_language(CUDA)
  if(CMAKE_CUDA_COMPILER)
    set(_tm_cuda ON)
  endif()
elseif(TOKENMILL_CUDA)
  set(_tm_cuda ON)
endif()

if(_tm_cuda)
  enable_language(CUDA)
  # The targets come from TOKENMILL_CUDA_ARCHS alone, on every configure: the
  # CMAKE_CUDA_ARCHITECTURES cache entry holds the compiler's own default
  # after the first configure, which would narrow a re-configured build.
  if(TOKENMILL_CUDA_ARCHS)
    set(_tm_archs_list ${TOKENMILL_CUDA_ARCHS})
  else()
    # Ampere, Ada, Hopper; Blackwell when the toolkit knows it.
    set(_tm_archs_list 80 89 90a)
    if(CMAKE_CUDA_COMPILER_VERSION VERSION_GREATER_EQUAL 12.8)
      list(APPEND _tm_archs_list 100a 120a)
    endif()
  endif()
  find_package(CUDAToolkit REQUIRED)
  message(STATUS "tokenmill: CUDA kernels for sm ${_tm_archs_list}")
  add_library(tokenmill_cuda STATIC ${TOKENMILL_GPU_SOURCES})
  set_target_properties(
    tokenmill_cuda PROPERTIES CUDA_STANDARD 17 CUDA_STANDARD_REQUIRED ON POSITION_INDEPENDENT_CODE ON
                              CUDA_ARCHITECTURES "${_tm_archs_list}")
  target_include_directories(tokenmill_cuda PUBLIC ${CMAKE_CURRENT_SOURCE_DIR}/cuda
                                                   ${CMAKE_CURRENT_SOURCE_DIR}/cpp/include)
  target_link_libraries(tokenmill_cuda PUBLIC CUDA::cudart)
  if(TOKENMILL_BUILD_PYTHON)
    add_library(_cuda_ops MODULE cuda/ops_cuda.cpp)
    target_include_directories(_cuda_ops PRIVATE ${TORCH_INCLUDE_DIR}
                                                 ${CMAKE_CURRENT_SOURCE_DIR}/cpp/bindings)
    target_link_libraries(_cuda_ops PRIVATE tokenmill_cuda)
    # Symbols resolve against the CUDA build of torch loaded in the process.
    target_link_options(_cuda_ops PRIVATE -Wl,--unresolved-symbols=ignore-all)
    set_target_properties(_cuda_ops PROPERTIES PREFIX "")
    install(TARGETS _cuda_ops LIBRARY DESTINATION tokenmill)
    # The wheel records which GPUs its kernels serve (tokenmill.devices reads it).
    string(JOIN "," _tm_archs ${_tm_archs_list})
    file(WRITE ${CMAKE_CURRENT_BINARY_DIR}/cuda_archs.txt "${_tm_archs}\n")
    install(FILES ${CMAKE_CURRENT_BINARY_DIR}/cuda_archs.txt DESTINATION tokenmill)
  endif()
endif()

# The same kernel sources compiled for the host emulation of the CUDA
# execution model (cuda/emulation/), as torch.ops.tokenmill_emulated_gpu.*:
# the kernel tests run them where there is no GPU. A test build option.
option(TOKENMILL_GPU_EMULATION "Build the GPU kernels for the host emulation (tests)" OFF)
if(TOKENMILL_GPU_EMULATION AND TOKENMILL_BUILD_PYTHON)
  set(_tm_emulated_sources cuda/emulation/runtime.cpp cuda/emulation/ops.cpp)
  foreach(_src ${TOKENMILL_GPU_SOURCES})
    get_filename_component(_name ${_src} NAME_WE)
    set(_wrapper ${CMAKE_CURRENT_BINARY_DIR}/emulated/${_name}.cpp)
    file(CONFIGURE OUTPUT ${_wrapper} CONTENT "#include \"${CMAKE_CURRENT_SOURCE_DIR}/${_src}\"\n")
    list(APPEND _tm_emulated_sources ${_wrapper})
  endforeach()
  add_library(_emulated_gpu_ops MODULE ${_tm_emulated_sources})
  target_compile_definitions(_emulated_gpu_ops PRIVATE TOKENMILL_GPU_EMULATION)
  target_compile_options(_emulated_gpu_ops PRIVATE -Wno-unknown-pragmas)
  target_include_directories(_emulated_gpu_ops PRIVATE ${CMAKE_CURRENT_SOURCE_DIR}/cuda
    ${CMAKE_CURRENT_SOURCE_DIR}/cpp/include ${CMAKE_CURRENT_SOURCE_DIR}/cpp/bindings
    ${TORCH_INCLUDE_DIR})
  target_link_directories(_emulated_gpu_ops PRIVATE ${TORCH_DIR}/lib)
  target_link_libraries(_emulated_gpu_ops PRIVATE torch_cpu)
  set_target_properties(_emulated_gpu_ops PROPERTIES PREFIX "" SKIP_BUILD_RPATH ON INSTALL_RPATH "")
  install(TARGETS _emulated_gpu_ops LIBRARY DESTINATION tokenmill)
endif()
