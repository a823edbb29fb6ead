"""The ctypes table, structs and enums match include/devmem.h."""

import ctypes
import re

import pytest

from conftest import HEADER
from devmem import _lib

TYPES = {
    "void": None,
    "void *": ctypes.c_void_p,
    "const void *": ctypes.c_void_p,
    "void **": ctypes.POINTER(ctypes.c_void_p),
    "ssize_t": ctypes.c_ssize_t,
    "int": ctypes.c_int,
    "int *": ctypes.POINTER(ctypes.c_int),
    "size_t": ctypes.c_size_t,
    "size_t *": ctypes.POINTER(ctypes.c_size_t),
    "uint64_t": ctypes.c_uint64,
    "uint64_t *": ctypes.POINTER(ctypes.c_uint64),
    "unsigned long long": ctypes.c_ulonglong,
    "unsigned long long *": ctypes.POINTER(ctypes.c_ulonglong),
    "const char *": ctypes.c_char_p,
    "char *": ctypes.c_char_p,
    "const char *const *": ctypes.POINTER(ctypes.c_char_p),
    "devmem_status": ctypes.c_int32,
    "devmem_host_policy *": ctypes.POINTER(ctypes.c_int32),
    "devmem_backend *": ctypes.POINTER(ctypes.c_int32),
    "void *const *": ctypes.POINTER(ctypes.c_void_p),
    "struct devmem_stats *": ctypes.POINTER(_lib.Stats),
    "struct devmem_residual *": ctypes.POINTER(_lib.Residual),
    "struct devmem_transfer *": ctypes.POINTER(_lib.Transfer),
    "struct devmem_allocation_info *": ctypes.POINTER(_lib.AllocationInfo),
    "const struct devmem_shared_store_options *": ctypes.POINTER(_lib.SharedStoreOptions),
    "const struct devmem_keep_options *": ctypes.POINTER(_lib.KeepOptions),
    "struct devmem_shared_store_info *": ctypes.POINTER(_lib.SharedStoreInfo),
    "devmem_read_only *": ctypes.POINTER(ctypes.c_int32),
    "devmem_allocation_callback": _lib.ALLOCATION_CALLBACK,
}


def header_text():
    text = re.sub(r"//[^\n]*", "", HEADER.read_text())
    return "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#") or "define" in line)


def prototypes():
    body = header_text().split('extern "C" {', 1)[1]
    found = {}
    for match in re.finditer(r"([A-Za-z_][\w\s\*]*?)\s*\b(\w+)\(([^;]*?)\);", body, re.S):
        ret, name, args = match.group(1), match.group(2), match.group(3)
        ret = " ".join(ret.replace("*", " * ").split()).replace(" *", " *").replace("* ", "*")
        params = []
        for arg in filter(None, (a.strip() for a in " ".join(args.split()).split(","))):
            if arg == "void":
                continue
            ctype = re.sub(r"\s*\b\w+$", "", arg)  # drop the parameter name
            params.append(ctype)
        found[name] = (ret, params)
    return found


def normalize(ctype):
    ctype = " ".join(ctype.replace("*", " * ").split())
    return ctype.replace(" * const * ", " *const *").replace("* *", "**").replace(" * ", " *").rstrip()


def as_ctypes(ctype):
    key = normalize(ctype)
    fixed = {normalize(k): v for k, v in TYPES.items()}
    assert key in fixed, f"no ctypes mapping for C type {ctype!r} ({key!r})"
    return fixed[key]


def test_every_header_function_is_in_the_table_and_back():
    header = prototypes()
    assert set(header) == set(_lib.FUNCTIONS), (set(header) ^ set(_lib.FUNCTIONS))


@pytest.mark.parametrize("name", sorted(_lib.FUNCTIONS))
def test_signature_matches_header(name):
    ret, params = prototypes()[name]
    restype, argtypes = _lib.FUNCTIONS[name]
    assert as_ctypes(ret) == restype, (name, ret)
    assert [as_ctypes(p) for p in params] == argtypes, (name, params)


def struct_fields(struct):
    match = re.search(r"typedef struct %s \{(.*?)\} %s;" % (struct, struct), header_text(), re.S)
    assert match, struct
    fields = []
    for decl in filter(None, (d.strip() for d in match.group(1).split(";"))):
        fields.append(re.sub(r"\[.*\]", "", decl.split()[-1]).lstrip("*"))
    return fields


@pytest.mark.parametrize(
    "struct,cls",
    [("devmem_counter", _lib.Counter), ("devmem_stats", _lib.Stats), ("devmem_transfer", _lib.Transfer),
     ("devmem_shared_store_info", _lib.SharedStoreInfo), ("devmem_residual", _lib.Residual),
     ("devmem_allocation_info", _lib.AllocationInfo), ("devmem_shared_store_options", _lib.SharedStoreOptions),
     ("devmem_keep_options", _lib.KeepOptions)],
)
def test_struct_fields_match_header(struct, cls):
    assert struct_fields(struct) == [f[0] for f in cls._fields_]


def test_status_and_state_values_match_header():
    text = header_text()
    for status in _lib.Status:
        assert re.search(rf"DEVMEM_STATUS_{status.name} = {status.value},", text), status
    for state in _lib.State:
        assert re.search(rf"DEVMEM_STATE_{state.name} = {state.value},", text), state
    for backend in _lib.Backend:
        assert re.search(rf"DEVMEM_BACKEND_{backend.name} = {backend.value},", text), backend
    for policy in _lib.HostPolicy:
        assert re.search(rf"DEVMEM_HOST_POLICY_{policy.name} = {policy.value},", text), policy
    for mode in _lib.ReadOnly:
        assert re.search(rf"DEVMEM_READ_ONLY_{mode.name} = {mode.value},", text), mode
    assert f"#define DEVMEM_SHARED_KEEP {_lib.SHARED_KEEP}" in text
    assert f"#define DEVMEM_SHARED_RECLAIM {_lib.SHARED_RECLAIM}" in text
    assert f"#define DEVMEM_MAX_TAG_LEN {_lib.MAX_TAG_LEN}" in text
    assert f"#define DEVMEM_TAG_BUFFER_LEN {_lib.TAG_BUFFER_LEN}" in text


def test_library_status_strings_agree():
    lib = _lib.load()
    for status in _lib.Status:
        assert lib.devmem_status_string(status.value).decode() == f"DEVMEM_STATUS_{status.name}"
