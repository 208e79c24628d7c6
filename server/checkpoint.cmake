# normd_checkpoint: crash-safe checkpoint files (server/checkpoint.h), included from
# server/CMakeLists.txt so the server and the tests link the same library.
find_package(spdlog REQUIRED)

add_library(normd_checkpoint STATIC
  ${CMAKE_CURRENT_LIST_DIR}/checkpoint.cc
  ${CMAKE_CURRENT_LIST_DIR}/checkpoint.proto
  ${CMAKE_CURRENT_LIST_DIR}/crc32c.cc
)
# Generated into gen/server/ so it is included as "server/checkpoint.pb.h", like every other
# header, relative to the repository root.
set(NORMD_CHECKPOINT_GEN_DIR ${CMAKE_CURRENT_BINARY_DIR}/gen)
file(MAKE_DIRECTORY ${NORMD_CHECKPOINT_GEN_DIR}/server)
protobuf_generate(TARGET normd_checkpoint LANGUAGE cpp
  PROTOC_OUT_DIR ${NORMD_CHECKPOINT_GEN_DIR}/server
  IMPORT_DIRS ${CMAKE_CURRENT_LIST_DIR} ${PROJECT_SOURCE_DIR}/proto)
set_source_files_properties(${NORMD_CHECKPOINT_GEN_DIR}/server/checkpoint.pb.cc
  PROPERTIES COMPILE_OPTIONS -w)
target_include_directories(normd_checkpoint PUBLIC ${PROJECT_SOURCE_DIR}
  PRIVATE ${NORMD_CHECKPOINT_GEN_DIR})
target_link_libraries(normd_checkpoint
  PUBLIC normd_core normd_proto
  PRIVATE spdlog::spdlog)

# normd_persistence: the server's Persistence hooks on top of normd_checkpoint
# (server/checkpoint_persistence.h). Needs the server library.
if(TARGET normd_server)
  add_library(normd_persistence STATIC ${CMAKE_CURRENT_LIST_DIR}/checkpoint_persistence.cc)
  target_link_libraries(normd_persistence
    PUBLIC normd_checkpoint normd_server
    PRIVATE spdlog::spdlog)
  if(TARGET normd)
    target_link_libraries(normd PRIVATE normd_persistence)
  endif()
endif()
