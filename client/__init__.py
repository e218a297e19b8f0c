"""Client SDK: sync and asyncio clients for streaming generation (grows in the stage-server issue)."""
