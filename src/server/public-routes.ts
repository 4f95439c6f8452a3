// Public, unauthenticated data: health and CA certificates (served on both listeners).

import type { FastifyInstance } from 'fastify';
import { sql } from 'kysely';
import type { Authority } from '../authority/authority.js';
import { HallmarkError } from '../errors.js';
import { encodePem } from '../pki/pem.js';

export function registerPublicRoutes(app: FastifyInstance, authority: Authority): void {
  app.get('/healthz', { schema: { hide: true } }, async (_request, reply) => {
    try {
      await sql`select 1`.execute(authority.store.db);
    } catch (err) {
      throw new HallmarkError('DATABASE_UNAVAILABLE', 'database unavailable', { cause: err });
    }
    return reply.header('cache-control', 'no-store').send({ status: 'ok', store: authority.store.dialect });
  });

  // /ca/root.pem, /ca/issuing-1.pem, /ca/issuing-1.crt (DER), /ca/issuing-1-chain.pem
  app.get<{ Params: { file: string } }>('/ca/:file', { schema: { hide: true } }, async (request, reply) => {
    const m = /^([A-Za-z0-9._-]+?)(-chain)?\.(pem|crt|cer)$/.exec(request.params.file);
    if (!m) throw new HallmarkError('NOT_FOUND', 'no such CA file (NAME.pem, NAME.crt or NAME-chain.pem)');
    const [, name, chain, ext] = m as unknown as [string, string, string | undefined, string];
    if (chain && ext !== 'pem') throw new HallmarkError('NOT_FOUND', 'chains are served as PEM only');
    const ders = await authority.caChain(name, !!chain);
    reply.header('cache-control', 'public, max-age=3600');
    if (ext === 'pem') return reply.type('application/x-pem-file').send(ders.map((d) => encodePem('CERTIFICATE', d)).join(''));
    return reply.type('application/pkix-cert').send(ders[0]);
  });
}
