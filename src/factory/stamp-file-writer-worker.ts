// The stamp file writer thread (stamp-file-writer.ts): writes each batch's files in order, synchronously.

import { closeSync, openSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { parentPort, workerData } from 'node:worker_threads';
import type { FileBatchReply, FileBatchRequest, FileWriterData } from './stamp-file-writer.js';

const { dir, mode } = workerData as FileWriterData;
const port = parentPort!;

function writeWhole(path: string, data: Uint8Array): void {
  const fd = openSync(path, 'w', mode);
  try {
    for (let at = 0; at < data.byteLength;) at += writeSync(fd, data, at, data.byteLength - at);
  } finally {
    closeSync(fd);
  }
}

port.on('message', (request: FileBatchRequest) => {
  const bytes = new Uint8Array(request.bytes);
  let at = 0;
  let reply: FileBatchReply = { id: request.id, ok: true };
  for (let i = 0; i < request.names.length; i++) {
    const name = request.names[i]!;
    const length = request.lengths[i]!;
    try {
      writeWhole(join(dir, name), bytes.subarray(at, at + length));
    } catch (err) {
      const e = err as NodeJS.ErrnoException;
      reply = { id: request.id, ok: false, file: name, code: e.code, message: e.message };
      break;
    }
    at += length;
  }
  port.postMessage(reply);
});
