// The streaming JSON array reader under the Microchip manifest import: element boundaries across
// any chunking, strings holding braces, and every way a file can be truncated or malformed.

import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { HallmarkError } from '../../../src/errors.js';
import { MAX_ELEMENT_BYTES, jsonArrayElements } from '../../../src/registry/manifests/json-array.js';
import { MCHP } from './fixtures.js';

async function* chunked(buf: Buffer, size: number): AsyncGenerator<Buffer> {
  for (let i = 0; i < buf.length; i += size) yield buf.subarray(i, i + size);
}

async function collect(text: string | Buffer, size = 7): Promise<{ index: number; line: number; value: unknown }[]> {
  const out = [];
  for await (const e of jsonArrayElements(chunked(Buffer.isBuffer(text) ? text : Buffer.from(text), size))) out.push(e);
  return out;
}

const refused = (pattern: RegExp, code = 'MANIFEST_INVALID') => (err: unknown): boolean => {
  assert.ok(err instanceof HallmarkError, String(err));
  assert.equal(err.code, code, err.message);
  assert.match(err.message, pattern);
  return true;
};

test('reads the real Microchip manifest identically whatever the chunk size', async () => {
  const file = readFileSync(join(MCHP, 'ECC608C-TNGTLSU-B.json'));
  const expected = JSON.parse(file.toString('utf8')) as unknown[];
  for (const size of [1, 2, 3, 13, 4096, file.length]) {
    const got = await collect(file, size);
    assert.deepEqual(got.map((e) => e.value), expected, `chunk size ${size}`);
    assert.deepEqual(got.map((e) => e.index), expected.map((_, i) => i + 1));
  }
});

test('strings holding braces, brackets, quotes and backslashes do not end an element; lines are counted', async () => {
  const values = [{ a: '}{][', b: 'q\\"}' }, { c: ['x', { d: '\\\\' }], e: 'é}' }];
  const text = `\ufeff[\n  ${JSON.stringify(values[0])},\n\n  ${JSON.stringify(values[1])}\n]\n`;
  const got = await collect(text, 1);
  assert.deepEqual(got.map((e) => e.value), values);
  assert.deepEqual(got.map((e) => e.line), [2, 4]);
  assert.deepEqual(await collect('[]'), []);
  assert.deepEqual(await collect(' [ ] \n'), []);
});

test('truncated and malformed arrays are refused, naming the entry', async () => {
  const one = JSON.stringify({ a: 1 });
  await assert.rejects(collect(''), refused(/empty/));
  await assert.rejects(collect('   \n'), refused(/empty/));
  await assert.rejects(collect(`[${one}, {"b": "x`), refused(/truncated: entry 2 .*not complete/));
  await assert.rejects(collect(`[${one}, ${one}`), refused(/truncated: the JSON array is not closed after entry 2/));
  await assert.rejects(collect(`[${one},`), refused(/truncated: the JSON array is not closed after entry 1/));
  await assert.rejects(collect('['), refused(/not closed/));
  await assert.rejects(collect(`{${one}}`), refused(/must start with "\["/));
  await assert.rejects(collect(`[${one}, 3]`), refused(/entry 2 .*not a JSON object/));
  await assert.rejects(collect(`[${one} ${one}]`), refused(/expected "," or "\]" after entry 1/));
  await assert.rejects(collect(`[${one}] x`), refused(/after the end of the JSON array/));
  await assert.rejects(collect(`[${one}, {"a": tru}]`), refused(/entry 2 \(line 1\) is not valid JSON/));
  await assert.rejects(collect(`[{"a": "${'x'.repeat(MAX_ELEMENT_BYTES)}"}]`, 65536), refused(/entry 1 .*over/, 'INPUT_TOO_LARGE'));
});
