// What a JavaScript project reading a brats_gan store with zarrita gets, for tests/test_readers.py.
//
//   node read.mjs STORE OUT NAME...
//
// Opens each array NAME of the Zarr v3 group STORE with zarrita and writes OUT/result.json:
// {"endianness", "attributes": the group's, "arrays": {NAME: {"data_type", "shape", and "strings" (a
// variable-length string array's values), or "file" (a numeric array's bytes, written to OUT/<file>),
// or "error" (what zarrita threw)}}}.
//
// zarr.open.v3, not zarr.open: the store is Zarr v3, and zarr.open reports a refused v3 array as
// "NotFoundError: Not found: v2 array" (it then tries v2), hiding zarrita's reason.
//
// Node before 24 has no Float16Array, and zarrita then refuses float16 ("Unknown or unsupported
// dataType: float16"); with --float16-bits a Uint16Array stands in for it, so that the bits zarrita
// decoded (sharding, zstd, crc32c) can still be compared.
import { writeFileSync } from "node:fs";
import { endianness } from "node:os";
import { join } from "node:path";
import { FileSystemStore } from "@zarrita/storage";
import * as zarr from "zarrita";

const args = process.argv.slice(2);
const float16Bits = args[0] === "--float16-bits";
const [store, out, ...names] = float16Bits ? args.slice(1) : args;
if (float16Bits && typeof globalThis.Float16Array === "undefined") {
  globalThis.Float16Array = class Float16Array extends Uint16Array {};
}

const root = zarr.root(new FileSystemStore(store));
const group = await zarr.open.v3(root, { kind: "group" });
const arrays = {};
for (const name of names) {
  try {
    const array = await zarr.open.v3(root.resolve(name), { kind: "array" });
    const { data, shape } = await zarr.get(array);
    const read = { data_type: array.dtype, shape };
    if (Array.isArray(data)) {
      read.strings = data;
    } else if (ArrayBuffer.isView(data)) {
      read.file = `${name.replaceAll("/", "__")}.bin`;
      writeFileSync(join(out, read.file), new Uint8Array(data.buffer, data.byteOffset, data.byteLength));
    } else {
      read.error = `zarrita returned a ${data?.constructor?.name}, neither strings nor a typed array`;
    }
    arrays[name] = read;
  } catch (err) {
    arrays[name] = { error: `${err.name}: ${err.message}` };
  }
}
writeFileSync(join(out, "result.json"), JSON.stringify({ endianness: endianness(), attributes: group.attrs, arrays }));
