"""Where asyncio work meets Qt: services run engine operations on the qasync loop and report through signals."""
