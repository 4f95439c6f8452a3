// The stamp file writer thread: files written whole with mode 0600, a failing file named in the error,
// later batches unaffected, and close() waiting for the writes already asked for.

import assert from 'node:assert/strict';
import { mkdirSync, mkdtempSync, readFileSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';
import { StampFileWriter } from '../../src/factory/stamp-file-writer.js';
import { hasCode } from '../helpers/assertions.js';

test('stamp file writer: whole files, 0600, errors name the file, close waits', async () => {
  const dir = mkdtempSync(join(tmpdir(), 'hallmark-file-writer-'));
  const writer = new StampFileWriter(dir);
  try {
    const files = Array.from({ length: 300 }, (_, i) => ({ name: `S-${i}.json`, bytes: Buffer.alloc(100 + i * 7, i % 251) }));
    await writer.write(files);
    for (const f of files) {
      assert.deepEqual(readFileSync(join(dir, f.name)), f.bytes);
      assert.equal(statSync(join(dir, f.name)).mode & 0o777, 0o600);
    }
    // The bytes handed over are the caller's to reuse: the writer copied them before transferring.
    assert.equal(files[1]!.bytes.length, 107);

    // Replacing an existing file writes the new content whole.
    await writer.write([{ name: 'S-1.json', bytes: Buffer.from('short') }]);
    assert.equal(readFileSync(join(dir, 'S-1.json'), 'utf8'), 'short');

    mkdirSync(join(dir, 'blocked.json'));
    await assert.rejects(writer.write([{ name: 'ok-before.json', bytes: Buffer.from('a') }, { name: 'blocked.json', bytes: Buffer.from('b') }]),
      (err: Error) => hasCode('STAMP_WRITE_FAILED')(err) && /blocked\.json/.test(err.message) && /EISDIR|illegal operation on a directory/.test(err.message));
    assert.equal(readFileSync(join(dir, 'ok-before.json'), 'utf8'), 'a');

    const later = writer.write([{ name: 'after.json', bytes: Buffer.from('still works') }]);
    await writer.close();
    await later;
    assert.equal(readFileSync(join(dir, 'after.json'), 'utf8'), 'still works');
    await assert.rejects(writer.write([{ name: 'x.json', bytes: Buffer.from('x') }]), /closed/);
  } finally {
    await writer.close();
    rmSync(dir, { recursive: true, force: true });
  }
});

test('stamp file writer: a directory that does not exist fails the batch with the reason', async () => {
  const writer = new StampFileWriter(join(tmpdir(), 'hallmark-no-such-dir', String(process.pid)));
  try {
    await assert.rejects(writer.write([{ name: 'a.json', bytes: Buffer.from('a') }]), (err: Error) => hasCode('STAMP_WRITE_FAILED')(err) && /ENOENT|no such file/.test(err.message));
  } finally {
    await writer.close();
  }
});
