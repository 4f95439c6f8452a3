// Temporary directories for tests, removed again when the test (or the process) ends.

import { mkdtempSync, rmSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

export interface TempDir {
  readonly path: string;
  /** Removes the directory and everything in it; safe to call twice. */
  cleanup(): Promise<void>;
}

const leftovers = new Set<string>();
process.once('exit', () => {
  for (const dir of leftovers) rmSync(dir, { recursive: true, force: true });
});

/** A fresh empty directory under the OS temp dir. */
export async function makeTempDir(prefix = 'hallmark-test-'): Promise<TempDir> {
  const path = await mkdtemp(join(tmpdir(), prefix));
  leftovers.add(path);
  return {
    path,
    async cleanup() {
      leftovers.delete(path);
      await rm(path, { recursive: true, force: true });
    },
  };
}

/** Synchronous variant, for module-level setup. Removed at process exit. */
export function makeTempDirSync(prefix = 'hallmark-test-'): string {
  const path = mkdtempSync(join(tmpdir(), prefix));
  leftovers.add(path);
  return path;
}

/** A temp dir removed when test context `t` finishes (`t.after`). */
export async function tempDirFor(t: { after(fn: () => unknown): void }, prefix?: string): Promise<string> {
  const dir = await makeTempDir(prefix);
  t.after(() => dir.cleanup());
  return dir.path;
}
