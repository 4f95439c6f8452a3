// Reading a whole file under a size limit: the size is checked before a byte is read, so an
// oversized input costs nothing. Callers turn the errors into their own codes and messages.

import { open } from 'node:fs/promises';

export class FileOverLimit extends Error {
  constructor(readonly path: string, readonly size: number, readonly limit: number) {
    super(`${path} is ${size} bytes, over the ${limit}-byte limit`);
    this.name = 'FileOverLimit';
  }
}

/** The file's bytes; FileOverLimit when it is larger than `limit`; open/read errors (ENOENT, EACCES, …) as thrown by node:fs. */
export async function readFileWithin(path: string, limit: number): Promise<Buffer> {
  const handle = await open(path, 'r');
  try {
    const size = (await handle.stat()).size;
    if (size > limit) throw new FileOverLimit(path, size, limit);
    const buf = Buffer.alloc(size);
    let off = 0;
    while (off < size) {
      const { bytesRead } = await handle.read(buf, off, size - off, off);
      if (bytesRead === 0) break;
      off += bytesRead;
    }
    return buf.subarray(0, off);
  } finally {
    await handle.close();
  }
}
