// src/files.ts: the size-limited reader and the file system flush.

import assert from 'node:assert/strict';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';
import { FileOverLimit, flushFileSystem, readFileWithin } from '../src/files.js';

test('readFileWithin: whole file under the limit; over it refused before reading; missing file reported', async () => {
  const dir = mkdtempSync(join(tmpdir(), 'hallmark-files-'));
  try {
    writeFileSync(join(dir, 'a'), Buffer.alloc(1000, 1));
    assert.equal((await readFileWithin(join(dir, 'a'), 1000)).length, 1000);
    await assert.rejects(readFileWithin(join(dir, 'a'), 999), (err: unknown) => err instanceof FileOverLimit && err.size === 1000 && err.limit === 999);
    await assert.rejects(readFileWithin(join(dir, 'missing'), 10), { code: 'ENOENT' });
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('flushFileSystem: flushes the file system of a directory; a directory that does not exist is an error', async () => {
  const dir = mkdtempSync(join(tmpdir(), 'hallmark-flush-'));
  try {
    writeFileSync(join(dir, 'stamp.json'), 'x');
    await flushFileSystem(dir);
    await assert.rejects(flushFileSystem(join(dir, 'no', 'such', 'dir')), /flushing .* failed/);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});
