// The offline root's CRL, once installed (hallmark root install-crl), is served at /crl/root.crl as
// installed; the root has no delta CRL; before any is installed the answer is 404.

import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { Authority } from '../../../src/authority/authority.js';
import { OfflineRoot } from '../../../src/authority/offline-root.js';
import { installRootCrl } from '../../../src/authority/root-rollover.js';
import { createLogger } from '../../../src/log.js';
import { startServers, type RunningServers } from '../../../src/server/servers.js';
import { createTestAuthority, type TestAuthority } from '../../helpers/authority.js';
import { call } from '../../helpers/http.js';

describe('the root CRL over HTTP', () => {
  let t: TestAuthority;
  let authority: Authority;
  let servers: RunningServers;

  before(async () => {
    t = await createTestAuthority();
    authority = await Authority.open(t.home, t.passphrase);
    servers = await startServers(authority, { host: '127.0.0.1', httpsPort: 0, httpPort: 0, logger: createLogger({ write: () => true } as unknown as NodeJS.WritableStream) });
  });
  after(async () => {
    await servers?.close();
    await authority?.close();
    await t?.cleanup();
  });

  test('404 before any root CRL is installed; then served as installed; no delta', async () => {
    assert.equal((await call(`${servers.httpUrl}/crl/root.crl`)).status, 404);
    const root = await OfflineRoot.open(t.rootDir, t.passphrase);
    const revoked = await root.revokeIntermediate({ ca: 'issuing-1', reason: 'keyCompromise' });
    await installRootCrl(authority, { crl: revoked.crl.der, actor: 'test' });
    const r = await new Promise<{ status: number; body: Buffer; headers: Record<string, unknown> }>((resolve, reject) => {
      import('node:http').then(({ get }) => get(`${servers.httpUrl}/crl/root.crl`, (res) => {
        const chunks: Buffer[] = [];
        res.on('data', (c: Buffer) => chunks.push(c));
        res.on('end', () => resolve({ status: res.statusCode ?? 0, body: Buffer.concat(chunks), headers: res.headers }));
      }).on('error', reject));
    });
    assert.equal(r.status, 200);
    assert.equal(r.headers['content-type'], 'application/pkix-crl');
    assert.ok(r.body.equals(revoked.crl.der), 'served exactly as the root signed it');
    const file = join(t.dir, 'root.crl');
    writeFileSync(file, r.body);
    const text = execFileSync('openssl', ['crl', '-inform', 'DER', '-in', file, '-noout', '-text'], { encoding: 'utf8' });
    assert.match(text, /Key Compromise/);
    assert.equal((await call(`${servers.httpUrl}/crl/root-delta.crl`)).status, 404);
  });
});
