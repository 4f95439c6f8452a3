// Stamp files written by one thread of their own, one after another.
//
// Why a thread: creating a file is a directory operation the kernel serialises per directory (the
// directory's inode lock), and on ext4 the inode allocation behind it costs 25–450 µs of kernel time
// per file depending on the file system's recent deletions (measured on this machine). Thirty-two
// concurrent writes on the libuv pool made four threads queue on that one lock — 13 % of a stamp run's
// CPU was spent spinning on it, and every write paid two thread-pool hand-offs. One thread writing
// sequentially does the same kernel work without the spinning, and the event loop only posts one
// message per chunk (the chunk's file bytes in one transferred buffer, no copy).
//
// Errors: the first failing file rejects its chunk with the file's name and the system's reason
// (ENOSPC, EACCES, …); later chunks still run, so the caller decides whether to stop.

import { Worker } from 'node:worker_threads';
import { HallmarkError } from '../errors.js';

export interface StampFile {
  readonly name: string;
  readonly bytes: Uint8Array;
}

/** What the writer thread is sent: names and lengths, and all bytes back to back in one buffer. */
export interface FileBatchRequest {
  readonly id: number;
  readonly names: readonly string[];
  readonly lengths: readonly number[];
  readonly bytes: ArrayBuffer;
}

export type FileBatchReply = { readonly id: number; readonly ok: true } | { readonly id: number; readonly ok: false; readonly file: string; readonly code?: string; readonly message: string };

export interface FileWriterData {
  readonly dir: string;
  /** File mode (0o600: stamp files hold private keys). */
  readonly mode: number;
}

export class StampFileWriter {
  readonly #worker: Worker;
  readonly #waiting = new Map<number, { resolve(): void; reject(err: Error): void }>();
  readonly #inFlight = new Set<Promise<void>>();
  #nextId = 1;
  #failed: Error | undefined;
  #closed = false;

  constructor(dir: string, mode = 0o600) {
    const data: FileWriterData = { dir, mode };
    this.#worker = new Worker(new URL('./stamp-file-writer-worker.js', import.meta.url), { workerData: data });
    this.#worker.on('message', (reply: FileBatchReply) => {
      const w = this.#waiting.get(reply.id);
      if (!w) return;
      this.#waiting.delete(reply.id);
      if (this.#waiting.size === 0) this.#worker.unref();
      if (reply.ok) w.resolve();
      else w.reject(new HallmarkError('STAMP_WRITE_FAILED', `cannot write stamp file ${reply.file}: ${reply.message}`, { cause: Object.assign(new Error(reply.message), { code: reply.code }) }));
    });
    this.#worker.on('error', (err) => this.#fail(err));
    this.#worker.on('exit', (code) => { if (!this.#closed) this.#fail(new Error(`the stamp file writer thread stopped (exit code ${code})`)); });
    // Idle, the thread must not keep a finished command alive; while writes are pending it must.
    this.#worker.unref();
  }

  #fail(err: Error): void {
    this.#failed ??= new HallmarkError('STAMP_WRITE_FAILED', `the stamp file writer thread failed: ${err.message}`, { cause: err });
    for (const w of this.#waiting.values()) w.reject(this.#failed);
    this.#waiting.clear();
  }

  /** Writes the files (replacing any of the same name); resolves once every one is written. */
  write(files: readonly StampFile[]): Promise<void> {
    if (this.#failed) return Promise.reject(this.#failed);
    if (this.#closed) return Promise.reject(new Error('the stamp file writer is closed'));
    if (files.length === 0) return Promise.resolve();
    let total = 0;
    for (const f of files) total += f.bytes.byteLength;
    // One fresh buffer (never a slice of Node's shared Buffer pool, which must not be transferred).
    const bytes = new Uint8Array(total);
    let at = 0;
    for (const f of files) { bytes.set(f.bytes, at); at += f.bytes.byteLength; }
    const id = this.#nextId++;
    const request: FileBatchRequest = { id, names: files.map((f) => f.name), lengths: files.map((f) => f.bytes.byteLength), bytes: bytes.buffer };
    const written = new Promise<void>((resolve, reject) => {
      this.#waiting.set(id, { resolve, reject });
      this.#worker.ref();
      this.#worker.postMessage(request, [bytes.buffer]);
    });
    this.#inFlight.add(written);
    const forget = (): void => { this.#inFlight.delete(written); };
    written.then(forget, forget);
    return written;
  }

  /** Stops the thread after the writes already asked for (their promises settle first). */
  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    await Promise.allSettled(this.#inFlight);
    await this.#worker.terminate();
  }
}
