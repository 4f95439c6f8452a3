// Claims through the admin API and the CLI: created once with their secret, listed without it, used
// through EST, revoked.

import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { generateKeyPairSync } from 'node:crypto';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { Authority } from '../../src/authority/authority.js';
import { createToken } from '../../src/authority/tokens.js';
import { createLogger } from '../../src/log.js';
import { createCsr } from '../../src/pki/csr.js';
import { encodeNameString } from '../../src/pki/names.js';
import { startServers, type RunningServers } from '../../src/server/servers.js';
import { createTestAuthority, type TestAuthority } from '../helpers/authority.js';
import { call } from '../helpers/http.js';

const execFileAsync = promisify(execFile);
const BIN = join(import.meta.dirname, '..', '..', '..', 'bin', 'hallmark.js');

function csrB64(): string {
  const { privateKey } = generateKeyPairSync('ec', { namedCurve: 'P-256' });
  return createCsr({ subject: encodeNameString('CN=x'), privateKey }).toString('base64');
}

describe('claims and enrolment approvals: admin API and CLI', () => {
  let t: TestAuthority;
  let authority: Authority;
  let servers: RunningServers;
  let ca: string;
  let admin: string;
  let reader: string;
  let batchId: string;

  before(async () => {
    t = await createTestAuthority();
    authority = await Authority.open(t.home, t.passphrase);
    servers = await startServers(authority, { host: '127.0.0.1', httpsPort: 0, httpPort: 0, logger: createLogger({ write: () => true } as unknown as NodeJS.WritableStream) });
    ca = (await import('node:fs')).readFileSync(t.rootPem, 'utf8');
    admin = (await createToken(authority.store, { scopes: ['registry:write', 'registry:read'], actor: 'test' })).token;
    reader = (await createToken(authority.store, { scopes: ['registry:read'], actor: 'test' })).token;
    await authority.registry.createProduct({ name: 'lamp', actor: 'test' });
    await authority.registry.createLine({ name: 'l1', ca: 'issuing-1', actor: 'test' });
    batchId = await authority.registry.createBatch({ product: 'lamp', line: 'l1', quota: 10, allowUnregistered: true, actor: 'test' });
  });

  after(async () => {
    await servers?.close();
    await authority?.close();
    await t?.cleanup();
  });

  const api = (path: string, options: { method?: string; body?: unknown; token?: string } = {}) => call(`${servers.httpsUrl}/api/v1${path}`, { ca, token: options.token ?? admin, method: options.method, body: options.body });
  const enroll = (basic: string, csr = csrB64()) => call(`${servers.httpsUrl}/.well-known/est/simpleenroll`, { method: 'POST', ca, rawBody: csr, headers: { 'content-type': 'application/pkcs10', authorization: `Basic ${Buffer.from(basic).toString('base64')}` } });

  test('create -> enrol -> list (no secret) -> revoke -> refused', async () => {
    const created = await api('/claims', { method: 'POST', body: { batch: batchId, uses: 3, ttl: '1h' } });
    assert.equal(created.status, 201, created.body);
    const claim = JSON.parse(created.body) as { id: string; secret: string; basic: string; maxUses: number };
    assert.equal(claim.basic, `${claim.id}:${claim.secret}`);
    assert.equal(created.headers['cache-control'], 'no-store');
    assert.equal((await enroll(claim.basic)).status, 200);
    const listed = await api(`/claims?batch=${batchId}`, { token: reader });
    assert.equal(listed.status, 200);
    assert.ok(!listed.body.includes(claim.secret), 'the secret is never listed');
    const item = (JSON.parse(listed.body) as { items: { id: string; used: number; status: string }[] }).items.find((c) => c.id === claim.id)!;
    assert.equal(item.used, 1);
    assert.equal(item.status, 'active');
    assert.equal((await api(`/claims/${claim.id}/revoke`, { method: 'POST', token: reader })).status, 403, 'revoking needs registry:write');
    const revoked = await api(`/claims/${claim.id}/revoke`, { method: 'POST' });
    assert.equal(revoked.status, 200);
    assert.equal(JSON.parse(revoked.body).status, 'revoked');
    assert.equal((await enroll(claim.basic)).status, 401);
    assert.equal((await api(`/claims/${claim.id}/revoke`, { method: 'POST' })).status, 404);
  });

  test('bad requests: unknown batch, zero uses, bad duration, unknown field', async () => {
    assert.equal((await api('/claims', { method: 'POST', body: { batch: 'nope', uses: 1, ttl: '1h' } })).status, 404);
    assert.equal((await api('/claims', { method: 'POST', body: { batch: batchId, uses: 0, ttl: '1h' } })).status, 400);
    assert.equal((await api('/claims', { method: 'POST', body: { batch: batchId, uses: 1, ttl: 'forever' } })).status, 400);
    assert.equal((await api('/claims', { method: 'POST', body: { batch: batchId, uses: 1, ttl: '1h', admin: true } })).status, 400);
  });

  test('CLI: claim create prints ID:SECRET once; claim list shows use; claim revoke', async () => {
    const env = { ...process.env, HALLMARK_PASSPHRASE: t.passphrase, HALLMARK_DATABASE_URL: '' };
    const hallmark = (...args: string[]) => execFileAsync(process.execPath, [BIN, ...args, '--home', t.home], { env, encoding: 'utf8' });
    const created = await hallmark('claim', 'create', '--batch', batchId, '--uses', '2', '--ttl', '24h');
    const basic = created.stdout.trim();
    assert.match(basic, /^cl_[0-9a-f]{16}:[A-Za-z0-9_-]{32}$/);
    assert.match(created.stderr, /not shown again/);
    assert.equal((await enroll(basic)).status, 200);
    const listed = await hallmark('claim', 'list', '--batch', batchId, '--json');
    const item = (JSON.parse(listed.stdout) as { id: string; used: number }[]).find((c) => basic.startsWith(c.id))!;
    assert.equal(item.used, 1);
    assert.ok(!listed.stdout.includes(basic.split(':')[1]!));
    await hallmark('claim', 'revoke', item.id);
    assert.equal((await enroll(basic)).status, 401);
    const bad = await hallmark('claim', 'create', '--batch', batchId, '--uses', '2').catch((e: { code: number; stderr: string }) => e);
    assert.equal((bad as { code: number }).code, 2, 'a missing option is a usage error');
  });

  test('approvals: a batch created with requireApproval through the API; pending requests listed, approved, then enrolled; CLI reject', async () => {
    const created = await api('/batches', { method: 'POST', body: { product: 'lamp', line: 'l1', quota: 5, allowUnregistered: true, requireApproval: true } });
    assert.equal(created.status, 201, created.body);
    const b = JSON.parse(created.body).id as string;
    assert.equal(JSON.parse(created.body).requireApproval, true);
    const claim = JSON.parse((await api('/claims', { method: 'POST', body: { batch: b, uses: 5, ttl: '1h' } })).body) as { basic: string };
    const csr = csrB64();
    assert.equal((await enroll(claim.basic, csr)).status, 202);
    const listed = JSON.parse((await api(`/enrolments?status=pending&batch=${b}`, { token: reader })).body) as { items: { id: string }[] };
    assert.equal(listed.items.length, 1);
    assert.equal((await api(`/enrolments/${listed.items[0]!.id}/approve`, { method: 'POST', token: reader })).status, 403);
    const approved = await api(`/enrolments/${listed.items[0]!.id}/approve`, { method: 'POST', body: { reason: 'checked the serial label' } });
    assert.equal(approved.status, 200, approved.body);
    assert.equal(JSON.parse(approved.body).status, 'approved');
    assert.equal((await enroll(claim.basic, csr)).status, 200);
    // CLI: list and reject.
    assert.equal((await enroll(claim.basic)).status, 202);
    const env = { ...process.env, HALLMARK_PASSPHRASE: t.passphrase, HALLMARK_DATABASE_URL: '' };
    const hallmark = (...args: string[]) => execFileAsync(process.execPath, [BIN, ...args, '--home', t.home], { env, encoding: 'utf8' });
    const pending = JSON.parse((await hallmark('enrolment', 'list', '--status', 'pending', '--batch', b, '--json')).stdout) as { id: string }[];
    assert.equal(pending.length, 1);
    const out = await hallmark('enrolment', 'reject', pending[0]!.id, '--reason', 'unknown unit');
    assert.match(out.stdout, /Rejected enrolment request er_/);
    assert.equal((await api(`/enrolments?status=rejected&batch=${b}`)).body.includes('unknown unit'), true);
  });
});
